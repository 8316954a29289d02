"""data.py: every file format reads the same rows; every malformed row names its line."""

from __future__ import annotations

import json

import pytest
from conftest import compose, compress, write_jsonl

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


def test_load_as_rows_gives_the_datasets_rows_in_order(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", _pairs(40))
    cfg = compose(f"data.train={p}", "data.eval_fraction=0.25")
    ds = data.load(cfg.data, "preference", seed=0, needed_train_rows=8)
    rows = data.load(cfg.data, "preference", seed=0, needed_train_rows=8, as_dataset=False)
    assert isinstance(rows.train, list) and isinstance(rows.eval, list)
    assert rows.train == [dict(r) for r in ds.train] and rows.eval == [dict(r) for r in ds.eval]
    assert rows.info == ds.info


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


# --------------------------------------------------------------------------- files as users have them


def _write_formats(tmp_path, rows, stem="a") -> dict[str, bytes]:
    """The bytes of ``rows`` as .jsonl, .json, .csv and .parquet."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    pbuf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), pbuf)
    return {
        ".jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
        ".json": json.dumps(rows, indent=2).encode(),
        ".csv": buf.getvalue().encode(),
        ".parquet": pbuf.getvalue(),
    }


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_read_like_plain_ones(tmp_path, compression):
    rows = _pairs(3)
    expected = data.validate_rows(
        data.read_rows(str(write_jsonl(tmp_path / "plain.jsonl", rows))), "preference"
    )
    for fmt, raw in _write_formats(tmp_path, rows).items():
        p = tmp_path / f"pairs{fmt}{compression}"
        p.write_bytes(compress(raw, compression))
        assert data.validate_rows(data.read_rows(str(p)), "preference") == expected, p.name


def test_bom_and_crlf_files_read(tmp_path):
    rows = _pairs(3)
    expected = data.validate_rows(
        data.read_rows(str(write_jsonl(tmp_path / "plain.jsonl", rows))), "preference"
    )
    for fmt, raw in _write_formats(tmp_path, rows).items():
        if fmt == ".parquet":
            continue
        p = tmp_path / f"windows{fmt}"
        p.write_bytes(b"\xef\xbb\xbf" + raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        got = data.read_rows(str(p))
        assert data.validate_rows(got, "preference") == expected, fmt
        if fmt == ".jsonl":
            assert [r.where.rsplit(":", 1)[1] for r in got] == ["1", "2", "3"]
    u16 = tmp_path / "powershell.jsonl"  # Windows PowerShell 5's `>` writes UTF-16 with a BOM
    u16.write_bytes(_write_formats(tmp_path, rows)[".jsonl"].decode().encode("utf-16"))
    assert data.validate_rows(data.read_rows(str(u16)), "preference") == expected


def test_not_utf8_names_line_byte_and_what_to_do(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        json.dumps(_pairs(1)[0]).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    )
    with pytest.raises(AlignError) as e:
        data.read_rows(str(p))
    assert str(e.value) == f"{p}:2: not UTF-8 text (byte 0xe9 at column 16); re-save it as UTF-8"
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(255, 0, -1)))
    with pytest.raises(AlignError) as e:
        data.read_rows(str(binary))
    assert str(e.value) == f"{binary}:1: not UTF-8 text (byte 0xff at column 1); re-save it as UTF-8"


def test_misnamed_and_damaged_compressed_files_are_named(tmp_path):
    raw = "".join(json.dumps(r) + "\n" for r in _pairs(20)).encode()
    p = tmp_path / "pairs.jsonl"
    p.write_bytes(compress(raw, ".gz"))
    with pytest.raises(
        AlignError, match=r"pairs.jsonl:1: not UTF-8 .*gzip-compressed data; rename it to .*pairs.jsonl.gz"
    ):
        data.read_rows(str(p))
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        cut = tmp_path / f"cut.jsonl{suffix}"
        full = compress(raw, suffix)
        cut.write_bytes(full[: len(full) // 2])
        with pytest.raises(AlignError, match=rf"cut.jsonl{suffix}: not valid \w+ data .*truncated, damaged"):
            data.read_rows(str(cut))


def test_file_names_decide_file_or_hub(tmp_path):
    with pytest.raises(AlignError, match=r"data file not found: missing.jsonl.gz \(set data.train="):
        data.read_rows("missing.jsonl.gz")  # not a hub dataset name
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(
        AlignError, match=r"unsupported file type '.txt'; use .jsonl/.json/.csv/.parquet, optionally"
    ):
        data.read_rows(str(tmp_path / "pairs.txt"))
    with pytest.raises(AlignError, match="is a directory"):
        data.read_rows(str(tmp_path))


def test_json_items_are_named_by_line(tmp_path):
    rows = _pairs(3)
    rows[2]["chosen"] = 7
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(rows, indent=2))  # each item spans 5 lines
    msg = _err(tmp_path, json.dumps(rows, indent=2), name="arr.json")
    assert f"{p}:12: 'chosen' must be a string" in msg
    wrapped = json.dumps({"version": 2, "data": rows[:2] + [[1]]}, indent=1)
    assert "w.json:14: expected a JSON object, got an array" in _err(tmp_path, wrapped, name="w.json")
    jsonl_as_json = tmp_path / "lines.json"  # JSON Lines saved as .json, as many hub datasets are
    write_jsonl(jsonl_as_json, _pairs(3))
    assert len(data.validate_rows(data.read_rows(str(jsonl_as_json)), "preference")) == 3


def test_duplicate_keys_and_columns_are_errors(tmp_path):
    line = '{"prompt": "a", "chosen": "b", "chosen": "c", "rejected": "d"}'
    assert "d.jsonl:2: key 'chosen' appears twice in one object" in _err(
        tmp_path, json.dumps(PAIR) + "\n" + line
    )
    assert "x.json:2: key 'chosen' appears twice in one object; keep one" in _err(
        tmp_path, f"[\n{line}]", name="x.json"
    )
    assert "c.csv:1: the header names column 'prompt' twice" in _err(
        tmp_path, "prompt,chosen,prompt,rejected\na,b,c,d\n", name="c.csv"
    )


def test_csv_shapes(tmp_path):
    msg = _err(tmp_path, "prompt,chosen,rejected\nq,a,b\nq,a,b,c\n", name="c.csv")
    assert "c.csv:3: 4 fields, but the header has 3; put a field that contains commas" in msg
    assert (
        "q.csv:2: 1 field, but the header has 2; a field is missing, or a double quote is never closed"
        in _err(tmp_path, 'prompt,chosen\n"unclosed,a\n', name="q.csv")
    )
    long = "word " * 60_000  # 300 KB: above the csv module's default field limit
    p = tmp_path / "ok.csv"
    p.write_text(
        f',prompt,chosen,rejected,margin\r\n0,"q, with comma",{long},b,1.5\r\n1,"two\nlines",a,b,2,\r\n'
    )
    rows = data.validate_rows(data.read_rows(str(p)), "preference")  # pandas' unnamed index column is dropped
    assert rows[0]["chosen"] == long and rows[0]["margin"] == 1.5 and rows[1]["prompt"] == "two\nlines"


def test_a_file_must_not_mix_text_and_message_rows(tmp_path):
    msg = _err(tmp_path, [PAIR, PAIR, _pairs(1)[0]])
    assert "d.jsonl:3: this row has chosen (text), prompt (text), rejected (text), but" in msg
    assert "d.jsonl:1 has chosen (messages)" in msg


def test_broken_unicode_escapes_and_non_text_are_errors(tmp_path):
    line = json.dumps(_pairs(1)[0]).replace("good", "good \\ud800")
    assert "d.jsonl:1: 'chosen' holds a lone surrogate \\ud800" in _err(tmp_path, line + "\n")
    sft = [{"text": [{"role": "user", "content": "hi"}]}]
    assert "d.jsonl:1: 'text' must be a string; a conversation goes in 'messages'" in _err(
        tmp_path, sft, "sft"
    )
    nested = [PAIR | {"prompt": [{"role": "user", "content": {"text": "hi"}}]}]
    assert "prompt[0] (user) content must be a string, not dict" in _err(tmp_path, nested)
