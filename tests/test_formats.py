"""align.formats: the dataset layouts people have load to the same canonical rows, the
detected format and the row counts are reported, and an ambiguous file is refused."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import compose, write_jsonl

from align import data, formats
from align.errors import AlignError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


def _load(path, kind="preference"):
    """(canonical rows, report) of one file, as data.load converts it."""
    report: dict = {}
    rows = data._validated(data.read_rows(str(path)), kind, skip=False, dropped=[], report=report)
    return [r for _, r in rows], report


def _err(path, kind="preference") -> str:
    with pytest.raises(AlignError) as e:
        data.validate_rows(data.read_rows(str(path)), kind)
    return str(e.value)


# --------------------------------------------------------------------------- preference


CANON_PAIRS = [
    {
        "prompt": [U(f"Name river {i}.")],
        "chosen": [A(f"The Nile {i}.")],
        "rejected": [A(f"Mount Everest {i}.")],
    }
    for i in range(3)
]


def test_explicit_pairs_are_the_canonical_format(tmp_path):
    rows, report = _load(write_jsonl(tmp_path / "p.jsonl", CANON_PAIRS))
    assert rows == CANON_PAIRS
    assert report == {"format": "prompt-chosen-rejected", "read": 3, "converted": 3, "skipped": 0}


def test_implicit_prompt_from_shared_leading_messages(tmp_path):
    raw = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CANON_PAIRS
    ]
    rows, report = _load(write_jsonl(tmp_path / "i.jsonl", raw))
    assert rows == CANON_PAIRS and report["format"] == "implicit-prompt"


def test_implicit_prompt_from_shared_text_prefix(tmp_path):
    raw = [{"chosen": "Q: name a river.\nA: The Nile.", "rejected": "Q: name a river.\nA: Everest."}]
    (row,), report = _load(write_jsonl(tmp_path / "t.jsonl", raw))
    assert report["format"] == "implicit-prompt"
    assert row == {"prompt": "Q: name a river.\nA:", "chosen": " The Nile.", "rejected": " Everest."}


def test_implicit_prompts_that_differ_are_an_error_naming_the_row(tmp_path):
    ok = {"chosen": [U("q"), A("yes")], "rejected": [U("q"), A("no")]}
    other = {"chosen": [U("q"), A("yes")], "rejected": [U("another question"), A("no")]}
    later = {
        "chosen": [U("q"), A("a"), U("more?"), A("yes")],
        "rejected": [U("q"), A("a"), U("less?"), A("no")],
    }
    msg = _err(write_jsonl(tmp_path / "d.jsonl", [ok, ok, other]))
    assert f"{tmp_path / 'd.jsonl'}:3: the prompts of 'chosen' and 'rejected' differ" in msg
    msg = _err(write_jsonl(tmp_path / "e.jsonl", [ok, later]))
    assert "e.jsonl:2: the prompts of 'chosen' and 'rejected' differ (message 2, user" in msg
    text = {"chosen": "Why is the sky blue?", "rejected": "Tell me a joke."}
    msg = _err(write_jsonl(tmp_path / "f.jsonl", [text]))
    assert "f.jsonl:1: 'chosen' and 'rejected' share no leading text, so there is no prompt" in msg


def _hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


HH = [
    {  # several turns: everything before the last Assistant turn is the prompt
        "chosen": _hh(
            ("Human", "Hi, can you help?"),
            ("Assistant", "Sure."),
            ("Human", "Name a river."),
            ("Assistant", "The Nile."),
        ),
        "rejected": _hh(
            ("Human", "Hi, can you help?"),
            ("Assistant", "Sure."),
            ("Human", "Name a river."),
            ("Assistant", "No."),
        ),
    },
    {
        "chosen": _hh(("Human", "What is 2+2?"), ("Assistant", "4")),
        "rejected": _hh(("Human", "What is 2+2?"), ("Assistant", "5")),
    },
    {  # an empty response, as in the real data
        "chosen": _hh(("Human", "Say something."), ("Assistant", "Hello.")),
        "rejected": _hh(("Human", "Say something."), ("Assistant", "")),
    },
]


def test_hh_rlhf_transcripts_become_conversations(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", HH[:2])
    rows, report = _load(p)
    assert report == {"format": "hh-rlhf", "read": 2, "converted": 2, "skipped": 0}
    assert rows[0] == {
        "prompt": [U("Hi, can you help?"), A("Sure."), U("Name a river.")],
        "chosen": [A("The Nile.")],
        "rejected": [A("No.")],
    }
    assert rows[1] == {"prompt": [U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]}


def test_hh_rlhf_empty_response_is_a_bad_row_or_skipped_and_counted(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", HH)
    assert f"{p}:3: 'rejected': the last Assistant turn (the response) is empty" in _err(p)
    report: dict = {}
    dropped: list[str] = []
    kept = data._validated(data.read_rows(str(p)), "preference", skip=True, dropped=dropped, report=report)
    assert len(kept) == 2 and len(dropped) == 1 and f"{p}:3:" in dropped[0]
    assert report == {"format": "hh-rlhf", "read": 3, "converted": 2, "skipped": 1}
    bad = dict(HH[1], rejected=_hh(("Human", "What is 3+3?"), ("Assistant", "5")))
    assert "hh2.jsonl:2: the prompts of 'chosen' and 'rejected' differ (turn 1" in _err(
        write_jsonl(tmp_path / "hh2.jsonl", [HH[0], bad])
    )


def test_ultrafeedback_ratings_become_the_margin(tmp_path):
    raw = [
        {
            "source": "evol",
            "prompt": r["prompt"][0]["content"],
            "chosen": r["prompt"] + r["chosen"],  # UltraFeedback's conversations hold the prompt
            "chosen-rating": 5,
            "chosen-model": "a",
            "rejected": r["prompt"] + r["rejected"],
            "rejected-rating": 2.5,
            "rejected-model": "b",
        }
        for r in CANON_PAIRS
    ]
    rows, report = _load(write_jsonl(tmp_path / "uf.jsonl", raw))
    assert report["format"] == "ultrafeedback"
    assert rows == [r | {"margin": 2.5} for r in CANON_PAIRS]
    scores = [  # HuggingFaceH4/ultrafeedback_binarized: score_chosen / score_rejected, here as a CSV
        {
            "prompt": f"q{i}",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            "score_chosen": "8.0",
            "score_rejected": "6.5",
        }
        for i in range(2)
    ]
    with (tmp_path / "uf.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(scores[0]))
        w.writeheader()
        w.writerows(scores)
    rows, report = _load(tmp_path / "uf.csv")
    assert report["format"] == "ultrafeedback-scores"
    assert rows[1] == {"prompt": "q1", "chosen": "good 1", "rejected": "bad 1", "margin": 1.5}
    implicit = [  # trl-lib/ultrafeedback_binarized: no prompt column, the conversations hold it
        {
            "chosen": r["prompt"] + r["chosen"],
            "rejected": r["prompt"] + r["rejected"],
            "score_chosen": 9,
            "score_rejected": 4,
        }
        for r in CANON_PAIRS
    ]
    rows, report = _load(write_jsonl(tmp_path / "trl.jsonl", implicit))
    assert report["format"] == "ultrafeedback-scores" and rows == [r | {"margin": 5.0} for r in CANON_PAIRS]
    other_prompt = raw[:1] + [raw[1] | {"rejected": [U("another question"), A("no")]}]
    assert "uf3.jsonl:2: the prompts of 'chosen' and 'rejected' differ (message 0, user" in _err(
        write_jsonl(tmp_path / "uf3.jsonl", other_prompt)
    )
    flipped = raw[:1] + [raw[1] | {"chosen-rating": 1}]
    assert "uf2.jsonl:2: 'chosen-rating' (1) is below 'rejected-rating' (2.5)" in _err(
        write_jsonl(tmp_path / "uf2.jsonl", flipped)
    )


# --------------------------------------------------------------------------- sft


CHAT = [  # the canonical SFT rows every conversational format below converts to
    {"prompt": [S("Be brief."), U(f"Translate {i}: water")], "completion": [A(f"eau {i}")]} for i in range(3)
]


def test_sft_prompt_completion(tmp_path):
    rows, report = _load(write_jsonl(tmp_path / "pc.jsonl", CHAT), "sft")
    assert rows == CHAT and report["format"] == "prompt-completion"


def test_sft_openai_messages_with_system_turns(tmp_path):
    raw = [{"messages": r["prompt"] + r["completion"]} for r in CHAT]
    rows, report = _load(write_jsonl(tmp_path / "m.jsonl", raw), "sft")
    assert rows == CHAT and report["format"] == "messages"


def test_sft_sharegpt_conversations(tmp_path):
    frm = {"system": "system", "user": "human", "assistant": "gpt"}
    raw = [
        {
            "id": i,
            "conversations": [
                {"from": frm[m["role"]], "value": m["content"]} for m in r["prompt"] + r["completion"]
            ],
        }
        for i, r in enumerate(CHAT)
    ]
    rows, report = _load(write_jsonl(tmp_path / "sg.jsonl", raw), "sft")
    assert rows == CHAT and report["format"] == "sharegpt"
    system_column = [{"system": "Be brief.", "conversations": r["conversations"][1:]} for r in raw]
    assert (
        _load(write_jsonl(tmp_path / "lf.jsonl", system_column), "sft")[0] == CHAT
    )  # LLaMA-Factory's layout
    raw[1]["conversations"][1]["from"] = "bot"
    assert "sg2.jsonl:2: conversations[1] has unknown 'from' 'bot'; use human, gpt or system" in _err(
        write_jsonl(tmp_path / "sg2.jsonl", raw), "sft"
    )


def test_sft_alpaca(tmp_path):
    raw = [
        {"instruction": "Translate to French.", "input": f"water {i}" if i else "", "output": f"eau {i}"}
        for i in range(3)
    ]
    raw[2]["text"] = (
        "Below is an instruction ... (tatsu-lab/alpaca's rendered column)"  # ignored: not 'text' format
    )
    rows, report = _load(write_jsonl(tmp_path / "al.jsonl", raw), "sft")
    assert report["format"] == "alpaca"
    assert rows[0] == {"prompt": [U("Translate to French.")], "completion": [A("eau 0")]}
    assert rows[1] == {"prompt": [U("Translate to French.\n\nwater 1")], "completion": [A("eau 1")]}
    llama_factory = raw[1] | {"system": "Be brief.", "history": [["Hi.", "Hello."]]}
    (row,), _ = _load(write_jsonl(tmp_path / "lf.jsonl", [llama_factory]), "sft")
    assert row["prompt"] == [S("Be brief."), U("Hi."), A("Hello."), U("Translate to French.\n\nwater 1")]
    raw[1]["output"] = " "
    assert "al2.jsonl:2: 'output' is empty" in _err(write_jsonl(tmp_path / "al2.jsonl", raw), "sft")


def test_sft_plain_text(tmp_path):
    raw = [{"text": f"Bees make honey {i}."} for i in range(2)]
    rows, report = _load(write_jsonl(tmp_path / "tx.jsonl", raw), "sft")
    assert rows == raw and report["format"] == "text"


# --------------------------------------------------------------------------- detection


def test_a_row_in_another_format_than_the_file_names_its_line(tmp_path):
    raw = [{"messages": r["prompt"] + r["completion"]} for r in CHAT] + [{"text": "stray"}]
    assert "x.jsonl:4: missing column 'messages' (the row has: text)" in _err(
        write_jsonl(tmp_path / "x.jsonl", raw), "sft"
    )


def test_ambiguous_or_unknown_file_is_refused_with_the_formats_and_the_columns_fix(tmp_path):
    both = [{"messages": [U("q"), A("a")], "conversations": [{"from": "human", "value": "q"}]}] * 2
    msg = _err(write_jsonl(tmp_path / "both.jsonl", both), "sft")
    assert msg.startswith(f"{tmp_path / 'both.jsonl'}:1: cannot tell the data format")
    assert "match several sft formats (messages, sharegpt)" in msg
    for name in ("prompt-completion", "messages", "sharegpt", "alpaca", "text"):
        assert name in msg
    assert "data.columns.<canonical>=<your column>" in msg and "\n" not in msg
    dolly = [{"question": "q", "answer": "a"}]
    msg = _err(write_jsonl(tmp_path / "qa.jsonl", dolly), "preference")
    assert (
        "qa.jsonl:1: cannot tell the data format: the columns (answer, question) match no preference format"
        in msg
    )
    assert (
        "prompt-chosen-rejected (prompt, chosen, rejected)" in msg
        and "hh-rlhf" in msg
        and "stage dpo, rm" in msg
    )
    assert "data.columns.prompt=question" in msg
    assert "Map your columns onto the canonical ones (prompt, chosen, rejected, margin)" in msg


def test_data_columns_rename_before_the_format_is_detected(tmp_path):
    renamed = [{"good": r["chosen"], "bad": r["rejected"]} for r in HH[:2]]
    p = write_jsonl(tmp_path / "hh-renamed.jsonl", renamed)
    cfg = compose(
        f"data.train={p}", "data.columns.chosen=good", "data.columns.rejected=bad", "data.eval_fraction=0"
    )
    split = data.load(cfg.data, "preference", seed=0)
    assert split.info["format"] == "hh-rlhf" and split.info["rows_converted"] == 2
    assert split.train[0]["prompt"][0]["role"] == "user"


def test_more_specific_formats_win():
    assert formats.matching({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference") == (
        "prompt-chosen-rejected",
    )
    assert formats.matching({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "preference") == (
        "hh-rlhf",
    )
    uf = {"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 1, "score_rejected": 0}
    assert formats.matching(uf, "preference") == ("ultrafeedback-scores",)
    assert formats.matching({"instruction": "i", "output": "o", "text": "t"}, "sft") == ("alpaca",)
    assert formats.matching({"prompt": None, "completion": None, "text": "t"}, "sft") == (
        "text",
    )  # null = absent


# --------------------------------------------------------------------------- datasets' loader


def test_local_dataset_directory_goes_through_load_dataset(tmp_path):
    d = tmp_path / "hh-copy"  # a downloaded hub repository: one data file per split
    d.mkdir()
    write_jsonl(d / "train.jsonl", HH[:2])
    write_jsonl(d / "test.jsonl", HH[1:2])
    rows, report = _load(d)
    assert report == {"format": "hh-rlhf", "read": 2, "converted": 2, "skipped": 0}
    assert data.read_rows(str(d), "test")[0].where == f"{d}[test]: row 0"
    with pytest.raises(AlignError, match="cannot load dataset .*split 'validation'"):
        data.read_rows(str(d), "validation")


def test_saved_dataset_and_subset_directories(tmp_path):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(HH[:2]), "test": Dataset.from_list(HH[1:2])}).save_to_disk(
        str(saved)
    )
    assert len(data.read_rows(str(saved), "test")) == 1
    assert _load(saved)[1]["format"] == "hh-rlhf"
    with pytest.raises(AlignError, match=r"no split 'dev' \(it has: train, test\); set data.split"):
        data.read_rows(str(saved), "dev")
    # subsets (configs) as a hub repository declares them in its README
    repo = tmp_path / "repo"
    (repo / "pairs").mkdir(parents=True)
    (repo / "sft").mkdir()
    write_jsonl(repo / "pairs" / "train.jsonl", CANON_PAIRS)
    write_jsonl(repo / "sft" / "train.jsonl", [{"messages": r["prompt"] + r["completion"]} for r in CHAT])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: pairs\n  data_files: pairs/*.jsonl\n"
        "- config_name: sft\n  data_files: sft/*.jsonl\n---\n"
    )
    cfg = compose(f"data.train={repo}", "data.subset=sft", "data.eval_fraction=0")
    split = data.load(cfg.data, "sft", seed=0)
    assert split.info["format"] == "messages" and split.info["rows_read"] == 3


def test_hub_name_passes_subset_and_split_to_load_dataset(tmp_path, monkeypatch, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(HH), parquet)
    real = datasets.load_dataset
    asked = []

    def fake(name, subset=None, split=None, **kw):  # the hub, served from the local parquet file
        asked.append((name, subset, split))
        return real("parquet", data_files=str(parquet), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = compose(
        "data.train=Anthropic/hh-rlhf",
        "data.subset=harmless",
        "data.split=train",
        "data.on_error=skip",
        "data.eval_fraction=0",
    )
    split = data.load(cfg.data, "preference", seed=0)
    assert asked == [("Anthropic/hh-rlhf", "harmless", "train")]
    info = split.info
    assert info["format"] == "hh-rlhf"
    assert (info["rows_read"], info["rows_converted"], info["rows_skipped"], info["dropped_rows"]) == (
        3,
        2,
        1,
        1,
    )
    err = capsys.readouterr().err
    assert "align: data: Anthropic/hh-rlhf: format hh-rlhf; 3 rows read, 2 converted, 1 skipped" in err
    assert "Anthropic/hh-rlhf[harmless/train]: row 2: 'rejected': the last Assistant turn" in err


def test_summary_counts_with_a_held_out_file_of_another_format(tmp_path):
    train = write_jsonl(tmp_path / "hh.jsonl", HH)
    held = write_jsonl(tmp_path / "held.jsonl", CANON_PAIRS[:2])
    cfg = compose(f"data.train={train}", f"data.eval={held}", "data.on_error=skip")
    info = data.load(cfg.data, "preference", seed=0).info
    assert info["format"] == "hh-rlhf" and info["eval_format"] == "prompt-chosen-rejected"
    assert (info["rows_read"], info["rows_converted"], info["rows_skipped"]) == (5, 4, 1)
    assert data.format_line(info) == (
        f"{train}: format hh-rlhf (held-out file: prompt-chosen-rejected); "
        "5 rows read, 4 converted, 1 skipped (data.on_error=skip)"
    )


# --------------------------------------------------------------------------- a stage on it


def test_rm_trains_on_hh_transcripts_and_reports_the_format(tiny_model, tmp_path, capsys):
    from conftest import tiny_overrides

    from align.stages import execute

    def pair(human: str, bad: str) -> dict:
        return {
            "chosen": _hh(("Human", human), ("Assistant", "The water river.")),
            "rejected": _hh(("Human", human), ("Assistant", bad)),
        }

    rows = [pair(f"Name river {i}.", "bad") for i in range(6)]
    rows.append(pair("Name a river.", ""))  # empty response: skipped
    rows.append(pair(" ".join(["water bees honey river"] * 60), "bad"))  # over model.max_length=128: dropped
    p = write_jsonl(tmp_path / "hh.jsonl", rows)
    cfg = compose(
        "stage=rm",
        *tiny_overrides(
            tiny_model,
            f"data.train={p}",
            "train.max_steps=1",
            "train.batch_size=8",
            "data.on_error=skip",
            "data.eval_fraction=0",
        ),
    )
    execute(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "artifact.json").read_text())["data"]
    assert info["format"] == "hh-rlhf" and info["train_rows"] == 6
    assert (info["rows_read"], info["rows_converted"], info["rows_skipped"], info["dropped_rows"]) == (
        8,
        7,
        1,
        2,
    )
    line = (
        f"{p}: format hh-rlhf; 8 rows read, 7 converted, 1 skipped (data.on_error=skip), "
        "1 dropped for a prompt over model.max_length"
    )
    captured = capsys.readouterr()
    assert f"align: data: {line}" in captured.err and f"  data     {line}" in captured.out
