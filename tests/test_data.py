"""data.py: every file format reads the same rows; every malformed row names its line."""

from __future__ import annotations

import json

import pytest
from conftest import compose, write_jsonl

from align import data
from align.errors import AlignError

PAIR = {
    "prompt": [{"role": "user", "content": "Say hi."}],
    "chosen": [{"role": "assistant", "content": "hi"}],
    "rejected": [{"role": "assistant", "content": "Hello there."}],
}


def _pairs(n=5):
    return [
        {"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
        for i in range(n)
    ]


def _err(tmp_path, rows_or_text, kind="preference", name="d.jsonl"):
    p = tmp_path / name
    if isinstance(rows_or_text, str):
        p.write_text(rows_or_text)
    else:
        write_jsonl(p, rows_or_text)
    with pytest.raises(AlignError) as e:
        data.validate_rows(data.read_rows(str(p)), kind)
    return str(e.value)


def test_missing_file_says_what_to_set(tmp_path):
    with pytest.raises(AlignError) as e:
        data.read_rows(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value) and "data.train" in str(e.value)


def test_json_syntax_error_names_line(tmp_path):
    text = json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n" + '{"prompt": "x", "chosen": \n'
    msg = _err(tmp_path, text)
    assert "d.jsonl:3:" in msg and "invalid JSON" in msg


def test_missing_column_names_line_and_column(tmp_path):
    rows = _pairs(3)
    del rows[1]["rejected"]
    msg = _err(tmp_path, rows)
    assert "d.jsonl:2:" in msg and "'rejected'" in msg and "the row has: chosen, prompt" in msg


def test_empty_text_names_line(tmp_path):
    rows = _pairs(4)
    rows[3]["chosen"] = "   "
    msg = _err(tmp_path, rows)
    assert "d.jsonl:4:" in msg and "'chosen' is empty" in msg


def test_chosen_identical_to_rejected_names_line(tmp_path):
    rows = _pairs(2)
    rows[1]["rejected"] = rows[1]["chosen"]
    msg = _err(tmp_path, rows)
    assert "d.jsonl:2:" in msg and "identical" in msg


def test_wrong_type_names_line(tmp_path):
    rows = _pairs(2)
    rows[0]["prompt"] = 42
    msg = _err(tmp_path, rows)
    assert "d.jsonl:1:" in msg and "int" in msg


def test_unknown_role_names_line(tmp_path):
    bad = json.loads(json.dumps(PAIR))
    bad["prompt"][0]["role"] = "human"
    msg = _err(tmp_path, [PAIR, bad])
    assert "d.jsonl:2:" in msg and "'human'" in msg


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    rows = _pairs(2)
    text = json.dumps(rows[0]) + "\n\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n"
    msg = _err(tmp_path, text)
    assert "d.jsonl:3:" in msg


def test_sft_messages_must_end_with_assistant(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    rows.append({"messages": [{"role": "user", "content": "hi"}]})
    msg = _err(tmp_path, rows, kind="sft")
    assert "d.jsonl:3:" in msg and "assistant" in msg


def test_sft_messages_become_prompt_completion(tmp_path):
    p = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ],
    )
    (row,) = data.validate_rows(data.read_rows(str(p)), "sft")
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["completion"] == [{"role": "assistant", "content": "a"}]


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    conv = lambda reply: [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]  # noqa: E731
    p = write_jsonl(tmp_path / "i.jsonl", [{"chosen": conv("yes"), "rejected": conv("no")}])
    (row,) = data.validate_rows(data.read_rows(str(p)), "preference")
    assert row["prompt"] == [{"role": "user", "content": "q"}]
    assert row["chosen"] == [{"role": "assistant", "content": "yes"}]


def test_all_file_formats_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _pairs(4)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        import csv

        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = data.validate_rows(data.read_rows(str(tmp_path / "a.jsonl")), "preference")
    for ext in ("json", "csv", "parquet"):
        got = data.validate_rows(data.read_rows(str(tmp_path / f"a.{ext}")), "preference")
        assert got == expected, ext


def test_csv_error_names_its_line(tmp_path):
    (tmp_path / "b.csv").write_text("prompt,chosen,rejected\nq,a,b\nq2,,b\n")
    with pytest.raises(AlignError) as e:
        data.validate_rows(data.read_rows(str(tmp_path / "b.csv")), "preference")
    assert "b.csv:3:" in str(e.value)


def test_load_holds_out_a_fraction_and_caps_train_rows(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", _pairs(40))
    cfg = compose(f"data.train={p}", "data.eval_fraction=0.25")
    split = data.load(cfg.data, "preference", seed=0)
    assert len(split.eval) == 10 and len(split.train) == 30
    assert not set(split.eval["prompt"]) & set(split.train["prompt"])
    capped = data.load(cfg.data, "preference", seed=0, needed_train_rows=8)
    assert len(capped.train) == 8 and len(capped.eval) == 10


def test_shipped_data_uses_held_out_topics_for_dpo_eval():
    cfg = compose()
    split = data.load(cfg.data, "preference", seed=0, needed_train_rows=16)
    assert split.info["eval"].endswith("pairs_test.jsonl")
    assert len(split.train) == 16 and len(split.eval) == cfg.data.max_eval_rows


def test_unknown_shipped_name_lists_choices():
    cfg = compose("data.name=nope")
    with pytest.raises(AlignError) as e:
        data.load(cfg.data, "preference", seed=0)
    assert "ifeval" in str(e.value) and "data.train" in str(e.value)
