"""Fuzz data.py's readers: corrupted variants of valid files in every supported format.

From a few valid files (.jsonl, .json, .csv, .parquet, each plain or .gz/.bz2/.xz/.zst) a
seeded generator makes a few hundred damaged variants. Each must either load to canonical
rows that a trainer can use, or fail with ONE AlignError that starts with the file's path
and names the line (or Parquet row) where it can. No other exception, no broken row.

Run with ``-s`` to see how many variants of each kind were tried.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
from collections import Counter

import pytest
from conftest import compose, compress

from align import data
from align.errors import AlignError

SEED = int(os.environ.get("ALIGN_FUZZ_SEED", "18"))  # another seed explores other variants
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")
MSG = lambda role, text: {"role": role, "content": text}  # noqa: E731

BASES: dict[str, tuple[str, list[dict], tuple[str, ...]]] = {
    # name: (row kind, rows, formats that can hold them)
    "pairs-text": (
        "preference",
        [
            {
                "prompt": f"Question {i}? Caf\u00e9 \u00fcber na\u00efve",
                "chosen": f"good {i}",
                "rejected": f"bad {i}",
            }
            | ({"margin": 0.5 * i} if i % 2 else {"margin": 1.0})
            for i in range(6)
        ],
        (".jsonl", ".json", ".csv", ".parquet"),
    ),
    "pairs-messages": (
        "preference",
        [
            {
                "prompt": [MSG("system", "Be brief."), MSG("user", f"Name a river {i}.")],
                "chosen": [MSG("assistant", f"The Nile {i}.")],
                "rejected": [MSG("assistant", f"A mountain \u26f0 {i}.")],
            }
            for i in range(6)
        ],
        (".jsonl", ".json", ".parquet"),
    ),
    "sft-messages": (
        "sft",
        [{"messages": [MSG("user", f"Say {i}."), MSG("assistant", f"{i} \u2014 done")]} for i in range(6)],
        (".jsonl", ".json", ".parquet"),
    ),
    "sft-text": (
        "sft",
        [{"prompt": f"Translate {i}: water", "completion": f"eau {i}"} for i in range(6)],
        (".jsonl", ".json", ".csv", ".parquet"),
    ),
    "prompts": (
        "prompt",
        [
            {"id": f"p{i}", "prompt": f"Write about bees {i}.", "constraints": '[{"type": "lowercase"}]'}
            for i in range(6)
        ],
        (".jsonl", ".json", ".csv", ".parquet"),
    ),
}

WRONG_VALUES = (
    42,
    -3.5,
    True,
    None,
    [],
    ["a", 1],
    {"text": "hi"},
    [{"role": "user"}],
    "",
    "   ",
    [[["deep"]]],
)


# --------------------------------------------------------------------------- writing


def serialize(rows: list[dict], fmt: str, *, surrogates: bool = False) -> bytes | None:
    """``rows`` in ``fmt``; None where the format cannot hold them (e.g. Parquet with mixed types)."""
    if fmt == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == ".json":
        return json.dumps(rows, indent=1).encode()
    if fmt == ".csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
        return buf.getvalue().encode("utf-8", "surrogatepass" if surrogates else "strict")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), out)
        return out.getvalue()
    except (pa.ArrowException, ValueError, TypeError, UnicodeEncodeError, OverflowError):
        return None


# --------------------------------------------------------------------------- mutations
# Each takes (rng, rows, fmt) and returns the file's bytes (before compression), or None
# when the mutation does not apply to that format.


def _copy(rows):
    return json.loads(json.dumps(rows))


def _pick(rng, rows):
    i = rng.randrange(len(rows))
    return i, rng.choice(sorted(rows[i]))


def m_wrong_type(rng, rows, fmt):
    rows = _copy(rows)
    value = rng.choice(WRONG_VALUES)
    i, col = _pick(rng, rows)
    targets = rows if fmt == ".parquet" else [rows[i]]  # a Parquet column has one type
    for r in targets:
        r[col] = value
    return serialize(rows, fmt)


def m_null(rng, rows, fmt):
    rows = _copy(rows)
    i, col = _pick(rng, rows)
    rows[i][col] = None
    if isinstance(rows[(i + 1) % len(rows)].get(col), list) and rng.random() < 0.5:  # a null message
        rows[(i + 1) % len(rows)][col][0] = None
    return serialize(rows, fmt)


def m_nested(rng, rows, fmt):
    """An object (or a list of lists, up to 5000 deep) where text is expected."""
    rows = _copy(rows)
    i, col = _pick(rng, rows)
    if isinstance(rows[i][col], list) and rows[i][col] and rng.random() < 0.3:
        rows[i][col][0]["content"] = {"text": rows[i][col][0]["content"]}
        return serialize(rows, fmt)
    if fmt == ".parquet":  # pyarrow's type inference blows up on deep nesting: keep it shallow
        deep: object = "x"
        for _ in range(rng.choice((2, 12))):
            deep = [deep] if rng.random() < 0.5 else {"k": deep}
        rows[i][col] = deep
        return serialize(rows, fmt)
    depth = rng.choice((2, 50, 5000))
    rows[i][col] = "@DEEP@"
    deep_json = (
        "[" * depth + "1" + "]" * depth if rng.random() < 0.5 else '{"a": ' * depth + "1" + "}" * depth
    )
    if fmt == ".csv":
        deep_json = '"' + deep_json.replace('"', '""') + '"'
    return serialize(rows, fmt).replace(b'"@DEEP@"' if fmt != ".csv" else b"@DEEP@", deep_json.encode())


def m_long_line(rng, rows, fmt):
    rows = _copy(rows)
    i, col = _pick(rng, rows)
    long = "long words " * rng.choice((20_000, 120_000))  # 0.2 / 1.3 MB on one line
    if isinstance(rows[i][col], list):
        rows[i][col][-1]["content"] = long
    elif isinstance(rows[i][col], str):
        rows[i][col] = long
    else:
        rows[i]["prompt"] = long
    return serialize(rows, fmt)


def m_missing_or_extra_column(rng, rows, fmt):
    rows = _copy(rows)
    i, col = _pick(rng, rows)
    if rng.random() < 0.5:
        del rows[i][col]
    else:
        rows[i]["unexpected"] = "column"
    return serialize(rows, fmt)


def m_surrogate(rng, rows, fmt):
    text = serialize(rows, fmt)
    if fmt in (".jsonl", ".json"):  # a broken \u escape
        s = text.decode()
        at = [m.start() + 1 for m in re.finditer(r'": "', s)]
        pos = rng.choice(at) + 2
        return (s[:pos] + rng.choice(("\\ud800", "\\udfff x", "\\ud83d")) + s[pos:]).encode()
    rows = _copy(rows)
    i, col = _pick(rng, rows)
    if isinstance(rows[i][col], str):
        rows[i][col] += "\ud800"
    return serialize(rows, fmt, surrogates=True)


def m_truncate(rng, rows, fmt):
    raw = serialize(rows, fmt)
    return raw[: rng.randrange(len(raw))]


def m_random_bytes(rng, rows, fmt):
    raw = bytearray(serialize(rows, fmt))
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def m_insert_bytes(rng, rows, fmt):
    raw = serialize(rows, fmt)
    pos = rng.randrange(len(raw))
    return raw[:pos] + rng.randbytes(rng.randint(1, 16)) + raw[pos:]


def m_empty_lines(rng, rows, fmt):
    if fmt == ".parquet":
        return None
    lines = serialize(rows, fmt).split(b"\n")
    for _ in range(rng.randint(1, 5)):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice((b"", b"   ", b"\t", b"\r", b"\xef\xbb\xbf")))
    return b"\n".join(lines)


def m_duplicate_key(rng, rows, fmt):
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        table = pa.Table.from_arrays(
            [*table.columns, table.column(0)], names=[*table.column_names, table.column_names[0]]
        )
        out = io.BytesIO()
        pq.write_table(table, out)
        return out.getvalue()
    raw = serialize(rows, fmt).decode()
    if fmt == ".csv":
        header, rest = raw.split("\r\n", 1)
        col = rng.choice(header.split(","))
        return (f"{header},{col}\r\n" + rest.replace("\r\n", ",x\r\n")).encode()
    starts = [m.start() for m in re.finditer(r'\{\s*"', raw)]
    pos = rng.choice(starts) + 1
    key = rng.choice(sorted({k for r in rows for k in r}))
    return (raw[:pos] + f'"{key}": "dup", ' + raw[pos:]).encode()


def m_mixed_formats(rng, rows, fmt):
    other = rng.choice([f for f in (".jsonl", ".json", ".csv") if f != fmt])
    choice = rng.random()
    if choice < 0.3 and fmt != ".csv":  # text rows and message rows in one file
        flipped = _copy(rows)
        r = flipped[rng.randrange(len(flipped))]
        for k, v in list(r.items()):
            if isinstance(v, list) and v and isinstance(v[0], dict):
                r[k] = v[-1]["content"]
            elif isinstance(v, str) and k in ("prompt", "chosen", "rejected", "completion"):
                r[k] = [MSG("user" if k == "prompt" else "assistant", v)]
        return serialize(flipped, fmt)
    mine, theirs = serialize(rows, fmt), serialize(rows[:2], other)
    if fmt == ".parquet":
        return mine + theirs
    lines = mine.split(b"\n")
    pos = rng.randrange(len(lines) + 1)
    return b"\n".join(lines[:pos] + theirs.split(b"\n") + lines[pos:])


def m_encoding(rng, rows, fmt):
    """Other encodings: Latin-1/cp1252 (an error), BOM + CRLF and UTF-16 with a BOM (both read)."""
    if fmt == ".parquet":
        return None
    text = serialize(rows, fmt).decode()
    choice = rng.choice(("cp1252", "latin-1", "bom-crlf", "utf-16", "utf-16-be-bom"))
    if choice == "bom-crlf":
        return b"\xef\xbb\xbf" + text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    if choice == "utf-16-be-bom":
        return b"\xfe\xff" + text.encode("utf-16-be")
    if fmt == ".jsonl" or fmt == ".json":  # make sure there is something outside ASCII to encode
        text = text.replace("\\u00e9", "\u00e9").replace("\\u00fc", "\u00fc").replace("\\u2014", "\u2014")
    return text.encode(choice, "replace")


MUTATIONS = {
    "wrong_type": m_wrong_type,
    "null": m_null,
    "nested": m_nested,
    "long_line": m_long_line,
    "missing_or_extra_column": m_missing_or_extra_column,
    "lone_surrogate": m_surrogate,
    "truncated": m_truncate,
    "random_bytes": m_random_bytes,
    "inserted_bytes": m_insert_bytes,
    "empty_lines": m_empty_lines,
    "duplicate_key": m_duplicate_key,
    "mixed_formats": m_mixed_formats,
    "encoding": m_encoding,
}


# --------------------------------------------------------------------------- checks


def canonical_problem(rows: list[dict], kind: str) -> str | None:
    """Why ``rows`` would break a trainer (None: they would not)."""

    def text_or_msgs(v):
        if isinstance(v, str):
            return "text" if v.strip() and v.encode("utf-8") else None
        if isinstance(v, list) and v:
            ok = all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and m["role"] in data.ROLES
                and isinstance(m["content"], str)
                and m["content"].strip()
                and m["content"].encode("utf-8")
                for m in v
            )
            return "messages" if ok else None
        return None

    expected = {
        "preference": ({"prompt", "chosen", "rejected"}, {"margin"}),
        "sft": ({"prompt", "completion"}, set()),
        "prompt": ({"prompt"}, {"constraints", "id"}),
    }[kind]
    shapes = set()
    for r in rows:
        keys = set(r)
        if kind == "sft" and keys == {"text"}:
            if not isinstance(r["text"], str) or not r["text"].strip():
                return f"bad text {r!r:.80}"
            shapes.add(("text",))
            continue
        need, optional = expected
        if not need <= keys <= need | optional:
            return f"keys {sorted(keys)}"
        forms = {k: text_or_msgs(r[k]) for k in need}
        if None in forms.values() or len(set(forms.values())) != 1:
            return f"not all text or all messages: {forms}"
        if "margin" in r and not (isinstance(r["margin"], float) and math.isfinite(r["margin"])):
            return f"margin {r['margin']!r}"
        for k in optional - {"margin"}:
            if k in r and not (isinstance(r[k], str) and r[k].encode("utf-8") is not None):
                return f"{k} {r[k]!r:.80}"
        shapes.add(tuple(sorted((k, type(v).__name__) for k, v in r.items())))
    if len(shapes) > 1:
        return f"rows of different shapes: {shapes}"
    return None


LOCATED = re.compile(r"(:\d+|: row \d+): ")
FILE_LEVEL = ("not valid ", "not a readable Parquet file", "appears twice; keep one")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from align.backbone import load_tokenizer

    return load_tokenizer(str(tiny_model), compose(f"model.name_or_path={tiny_model}").model)


def test_fuzzed_files_load_or_fail_with_one_located_align_error(tmp_path, tokenizer):
    from datasets import Dataset

    rng = random.Random(SEED)
    tried, loaded, refused = Counter(), Counter(), Counter()
    problems: list[str] = []
    n = 0
    for base, (kind, rows, formats) in BASES.items():
        for fmt in formats:
            for name, mutate in MUTATIONS.items():
                for compression in rng.sample(COMPRESSIONS, 2):
                    raw = mutate(rng, rows, fmt)
                    if raw is None:  # the format cannot hold this corruption
                        continue
                    n += 1
                    path = tmp_path / f"v{n}-{base}{fmt}{compression}"
                    packed = compress(raw, compression) if compression else raw
                    if compression and name in ("truncated", "random_bytes") and rng.random() < 0.5:
                        packed = packed[: len(packed) // 2]  # damage the compressed stream itself
                    path.write_bytes(packed)
                    tried[name] += 1
                    label = f"{name} {path.name}"
                    try:
                        got = data.validate_rows(data.read_rows(str(path)), kind)
                    except AlignError as e:
                        refused[name] += 1
                        msg = str(e)
                        after = msg[len(str(path)) :]
                        if not msg.startswith(str(path)) or "\n" in msg:
                            problems.append(f"{label}: message does not start with the file: {msg[:300]!r}")
                        elif not LOCATED.match(after) and not any(p in msg for p in FILE_LEVEL):
                            problems.append(f"{label}: message names no line: {msg[:300]!r}")
                        continue
                    except Exception as e:  # noqa: BLE001 - exactly what this test hunts for
                        problems.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    loaded[name] += 1
                    why = canonical_problem(got, kind)
                    if why:
                        problems.append(f"{label}: loaded a row a trainer cannot use: {why}")
                        continue
                    try:
                        Dataset.from_list(got)  # one column type per key (what cached_dataset stores)
                        for row in got[:3]:
                            if sum(len(json.dumps(v)) for v in row.values()) < 5000:
                                data._prompt_tokens(row, tokenizer)  # chat template + tokenizer
                    except Exception as e:  # noqa: BLE001
                        problems.append(
                            f"{label}: loaded rows break later: {type(e).__name__}: {str(e)[:200]}"
                        )
    width = max(map(len, MUTATIONS))
    print(f"\nfuzz (seed {SEED}): {sum(tried.values())} variants")
    for name in MUTATIONS:
        print(
            f"  {name:<{width}}  tried {tried[name]:3d}  loaded {loaded[name]:3d}  AlignError {refused[name]:3d}"
        )
    assert not problems, f"{len(problems)} of {sum(tried.values())} variants:\n" + "\n".join(problems[:40])
    assert sum(tried.values()) >= 300 and all(tried[m] for m in MUTATIONS)
