"""THE one place that reads datasets.

Files (.jsonl, .json, .parquet, .csv) or a hub dataset name go in; validated rows in the
shape TRL's trainers expect come out. Every malformed row fails with an AlignError that
names the file, the line (or row) and the problem.

Accepted row shapes: the canonical columns below, or any layout align.formats detects
and converts to them (HH-RLHF transcripts, UltraFeedback, ShareGPT, Alpaca, ...):

* preference (dpo, rm): ``prompt`` + ``chosen`` + ``rejected``, each a string or a list
  of ``{"role", "content"}`` messages, and an optional ``margin``.
* sft: ``messages`` (the last assistant turn is the completion, the turns before it the
  prompt), ``prompt`` + ``completion``, or plain ``text``.
* prompt (grpo, rloo, ppo, eval): ``prompt`` (+ ``constraints``, ``id``).
* classify: ``text`` + ``label`` (an int, a bool or a string) + an optional numeric ``weight``.
* unpaired (kto): ``prompt`` + ``completion`` (strings or message lists) + ``label`` (true: a
  desirable completion, false: an undesirable one). A file of preference pairs is read too:
  each pair becomes a desirable and an undesirable row (:func:`unpair`).

Any column may have another name in the file: ``data.columns.<canonical>=<file column>``
(e.g. ``data.columns.text=code``) renames it as the rows are read, for every stage, before
the layout is detected.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import formats
from align.cache import cache_root
from align.errors import AlignError

ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
ACCEPTED = ".jsonl/.json/.csv/.parquet, optionally compressed as .gz/.bz2/.xz/.zst"

# (data.name, row kind) -> (train file, held-out file or None) under reward_data/
# (classify rows: under classify_data/)
SHIPPED = {
    ("ifeval", "sft"): ("sft_train.jsonl", None),
    ("ifeval", "preference"): ("pairs_train.jsonl", "pairs_test.jsonl"),
    ("ifeval", "prompt"): ("prompts_train.jsonl", "prompts_test.jsonl"),
    ("tiny", "sft"): ("tiny_sft.jsonl", None),
    ("tiny", "preference"): ("tiny_pairs.jsonl", None),
    ("ifeval", "unpaired"): ("pairs_train.jsonl", "pairs_test.jsonl"),  # pairs, split by unpair()
    ("tiny", "unpaired"): ("tiny_pairs.jsonl", None),
    ("defects", "classify"): ("defects_train.jsonl", "defects_test.jsonl"),
    ("defects_imbalanced", "classify"): ("defects_imbalanced_train.jsonl", "defects_imbalanced_test.jsonl"),
}


def reward_data_dir() -> Path:
    """The shipped data: reward_data/ in a checkout, align/reward_data in an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "reward_data", here.parent / "reward_data"):
        if (cand / "pairs_train.jsonl").is_file():
            return cand
    raise AlignError("the shipped reward_data/ directory is missing from this installation; reinstall align")


def classify_data_dir() -> Path:
    """The shipped code-defect set: classify_data/ in a checkout, align/classify_data in a wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "classify_data", here.parent / "classify_data"):
        if (cand / "defects_train.jsonl").is_file():
            return cand
    raise AlignError(
        "the shipped classify_data/ directory is missing from this installation; reinstall align"
    )


@dataclass
class Row:
    where: str  # "file:line" (or "file:row N")
    data: dict[str, Any]


@dataclass
class Split:
    train: Any  # datasets.Dataset (a list of dicts with data.load(as_dataset=False))
    eval: Any | None
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def read_rows(source: str, split: str = "train", subset: str | None = None) -> list[Row]:
    """Raw rows of a file, a dataset directory or a hub dataset, each tagged with where it came from.

    A directory is a local copy of a hub dataset (its data files, or ``save_to_disk`` output);
    it goes through ``datasets`` like a hub name, with ``split`` and ``subset`` (its config)."""
    path = Path(source).expanduser()
    fmt, _ = file_format(path)
    if path.is_dir():
        return _read_dir(path, source, split, subset)
    if fmt or path.exists() or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise AlignError(f"data file not found: {source} (set data.train=<path to {ACCEPTED}>)")
        return _read_file(path)
    return _read_hub(source, split, subset)


def file_format(path: str | Path) -> tuple[str | None, str | None]:
    """(format, compression) suffixes of a data file name: ``pairs.jsonl.gz`` -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes and suffixes[-1] in FILE_SUFFIXES else None
    return fmt, compression


def _read_file(path: Path) -> list[Row]:
    name = str(path)
    fmt, compression = file_format(path)
    if fmt is None:
        got = "".join(path.suffixes[-2:]) or "(none)"
        raise AlignError(f"{name}: unsupported file type {got!r}; use {ACCEPTED}")
    raw = _read_bytes(path, compression)
    if fmt == ".parquet":
        return _parquet_rows(raw, name)
    text = _decode(raw, name)
    if fmt == ".jsonl":
        return _jsonl_rows(text, name)
    if fmt == ".json":
        return _json_rows(text, name)
    return _csv_rows(text, name)


def _read_bytes(path: Path, compression: str | None) -> bytes:
    """The file's bytes, decompressed."""
    if compression is None:
        return path.read_bytes()
    codec = COMPRESSIONS[compression]
    try:
        if compression == ".zst":  # pyarrow (which datasets needs anyway) bundles zstd
            import pyarrow as pa

            with pa.input_stream(str(path), compression="zstd") as f:
                return f.read()
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[compression]
        with opener(path, "rb") as f:
            return f.read()
    except MemoryError:
        raise
    except Exception as e:  # every codec has its own exception types; here they all mean the same
        raise AlignError(
            f"{path}: not valid {codec} data ({type(e).__name__}: {_first_line(e)}); the file is truncated, "
            f"damaged or not {codec}-compressed: download or compress it again"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


# What a file that is not UTF-8 text may really be: (leading bytes, what it is, what to do).
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data", "rename it to {name}.gz"),
    (b"BZh", "bzip2-compressed data", "rename it to {name}.bz2"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "rename it to {name}.xz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "rename it to {name}.zst"),
    (b"PAR1", "a Parquet file", "give it the .parquet suffix"),
    (b"PK\x03\x04", "a ZIP archive (an Excel workbook?)", "export it as CSV (UTF-8) or JSON Lines"),
)


_CONTROL = re.compile("[\x00-\x08\x0e-\x1f]")
_STRUCTURE = re.compile('[{\\["\n,]')  # JSON and CSV text has one of these near its start


def _decode(raw: bytes, name: str) -> str:
    """The text of a data file: UTF-8 (a leading BOM is dropped), or UTF-16 with its BOM."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # e.g. Windows PowerShell's `>`
        try:
            text = raw.decode("utf-16")  # the BOM gives the byte order; decoding drops it
        except UnicodeDecodeError:
            text = "\x00"
        if not _CONTROL.search(text) and _STRUCTURE.search(text, 0, 200):
            return text
        # not UTF-16 JSON or CSV after all (binary that starts with 0xff 0xfe): say where UTF-8 fails
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        where = f"{name}:{line}: not UTF-8 text (byte 0x{raw[at]:02x} at column {column})"
        for magic, what, todo in MAGIC:
            if raw.startswith(magic):
                raise AlignError(f"{where}: it looks like {what}; {todo.format(name=name)}") from None
        raise AlignError(f"{where}; re-save it as UTF-8") from None


class _DuplicateKey(ValueError):
    pass


class _ItemError(ValueError):
    """A problem inside one item of a JSON array, with the line the item starts on."""

    def __init__(self, cause: Exception, line: int):
        super().__init__(str(cause))
        self.cause, self.line = cause, line


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_PLAIN = json.JSONDecoder()


def _json_error(e: Exception, name: str, line: int | None) -> AlignError:
    """An AlignError for what ``_DECODER`` raised, at ``line`` (or the decode error's own line)."""
    if isinstance(e, json.JSONDecodeError):
        at = e.lineno if line is None else line
        return AlignError(f"{name}:{at}: invalid JSON ({e.msg} at column {e.colno})")
    if isinstance(e, _ItemError):
        e, line = e.cause, e.line
    at = f"{name}:{line}" if line is not None else name
    if isinstance(e, _DuplicateKey):
        return AlignError(f"{at}: key {e.args[0]!r} appears twice in one object; keep one")
    if isinstance(e, RecursionError):
        return AlignError(f"{at}: invalid JSON (nested too deeply)")
    return AlignError(f"{at}: invalid JSON ({_first_line(e)})")  # e.g. an integer with >4300 digits


JSON_ERRORS = (ValueError, RecursionError)  # JSONDecodeError and _DuplicateKey are ValueErrors


def _jsonl_rows(text: str, name: str, first_line: int = 1) -> list[Row]:
    rows = []
    for n, line in enumerate(io.StringIO(text, newline=None), start=first_line):  # \n, \r\n or \r
        line = line.removeprefix("\ufeff").removesuffix("\n")  # a BOM: files concatenated with theirs
        if not line.strip():
            continue
        try:
            obj = _DECODER.decode(line)
        except JSON_ERRORS as e:
            raise _json_error(e, name, n) from None
        if not isinstance(obj, dict):
            raise AlignError(f"{name}:{n}: expected a JSON object, got {_json_type(obj)}")
        rows.append(Row(f"{name}:{n}", obj))
    return rows


def _json_type(obj: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(obj), "a number")


_WS = re.compile(r"[ \t\n\r]*")


def _json_rows(text: str, name: str) -> list[Row]:
    """A JSON array of objects, ``{"data": [...]}``, or JSON Lines saved as .json (as ``datasets`` reads it)."""
    start = _WS.match(text).end()
    if start == len(text):
        return []
    try:
        if text[start] == "[":
            items, end = _array_items(text, start)
        else:
            obj, end = _PLAIN.raw_decode(text, start)  # the items' keys are checked below
            if _WS.match(text, end).end() != len(text) and isinstance(obj, dict):
                return _jsonl_rows(text, name)  # more than one value: JSON Lines
            if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
                raise AlignError(
                    f"{name}:{text.count(chr(10), 0, start) + 1}: expected a JSON array of objects, "
                    f'{{"data": [...]}}, or one object per line; got {_json_type(obj)}'
                )
            items, _ = _array_items(text, _data_array_start(text, start))
        if _WS.match(text, end).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, _WS.match(text, end).end())
    except JSON_ERRORS as e:
        raise _json_error(e, name, None) from None
    rows, line, last = [], 1, 0
    for pos, item in items:
        line += text.count("\n", last, pos)
        last = pos
        if not isinstance(item, dict):
            raise AlignError(f"{name}:{line}: expected a JSON object, got {_json_type(item)}")
        rows.append(Row(f"{name}:{line}", item))
    return rows


def _array_items(text: str, pos: int) -> tuple[list[tuple[int, Any]], int]:
    """The items of the JSON array at ``text[pos] == '['`` with their offsets, and the end offset."""
    items: list[tuple[int, Any]] = []
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        try:
            item, end = _DECODER.raw_decode(text, pos)
        except (_DuplicateKey, RecursionError) as e:  # name the line where the item starts
            raise _ItemError(e, text.count("\n", 0, pos) + 1) from None
        items.append((pos, item))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return items, pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _data_array_start(text: str, pos: int) -> int:
    """Offset of the array under the key "data" of the (valid) JSON object at ``text[pos] == '{'``."""
    plain = _PLAIN
    pos = _WS.match(text, pos + 1).end()
    while True:
        key, pos = plain.raw_decode(text, pos)
        pos = _WS.match(text, pos).end() + 1  # past ':'
        pos = _WS.match(text, pos).end()
        if key == "data" and text.startswith("[", pos):
            return pos
        _, pos = plain.raw_decode(text, pos)
        pos = _WS.match(text, _WS.match(text, pos).end() + 1).end()  # past ','


def _csv_rows(text: str, name: str) -> list[Row]:
    """Rows of a CSV file with a header line; line numbers count the header as line 1."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long response is a legitimate cell (the default stops at 128 KiB)
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        seen: set[str] = set()
        for h in header:
            if h and h in seen:
                raise AlignError(f"{name}:1: the header names column {h!r} twice; keep one")
            seen.add(h)
        rows, line = [], reader.line_num + 1
        for fields in reader:
            if fields:
                if len(fields) < len(header) or any(x.strip() for x in fields[len(header) :]):
                    n = f"{len(fields)} field{'s' * (len(fields) != 1)}"
                    why = (
                        "a field is missing, or a double quote is never closed"
                        if len(fields) < len(header)
                        else 'put a field that contains commas or line breaks in double quotes ("...")'
                    )
                    raise AlignError(f"{name}:{line}: {n}, but the header has {len(header)}; {why}")
                rows.append(
                    Row(
                        f"{name}:{line}",
                        {h: v for h, v in zip(header, fields[: len(header)], strict=True) if h},
                    )
                )
            line = reader.line_num + 1
        return rows
    except csv.Error as e:
        raise AlignError(f"{name}:{reader.line_num}: malformed CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(raw: bytes, name: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(raw))
        columns = pf.schema_arrow.names
        dup = next((c for c in columns if columns.count(c) > 1), None)
        if dup is None:
            records = pf.read().to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        raise AlignError(
            f"{name}: not a readable Parquet file ({type(e).__name__}: {_first_line(e)}); is it complete?"
        ) from None
    if dup is not None:
        raise AlignError(f"{name}: column {dup!r} appears twice; keep one")
    return [Row(f"{name}: row {i}", r) for i, r in enumerate(records)]


SAVED = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write


def _read_dir(path: Path, source: str, split: str, subset: str | None) -> list[Row]:
    if any((path / f).is_file() for f in SAVED):
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged save: say which and why
            raise AlignError(
                f"{source}: not a readable saved dataset ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise AlignError(
                    f"{source}: no split {split!r} (it has: {', '.join(ds)}); set data.split=<one of them>"
                )
            ds = ds[split]
        return _dataset_rows(ds, f"{source}[{split}]")
    files = [
        p
        for p in path.rglob("*")
        if p.is_file()
        and file_format(p)[0]
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise AlignError(
            f"data file {source} is a directory with no data files ({ACCEPTED}) and no saved dataset; "
            "give a file, or a directory holding them"
        )
    return _read_hub(str(path), split, subset)


def _read_hub(name: str, split: str, subset: str | None = None) -> list[Row]:
    """Rows of ``datasets.load_dataset(name, subset, split=split)``: a hub name or a local dataset directory."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, subset, split=split)
    except Exception as e:  # offline, missing, gated, no such split or subset: say what was asked for
        asked = f"split {split!r}" + (f", subset {subset!r}" if subset else "")
        raise AlignError(
            f"cannot load dataset {name!r} ({asked}; data.split / data.subset): {_first_line(e)}"
        ) from None
    return _dataset_rows(ds, f"{name}[{split}]" if not subset else f"{name}[{subset}/{split}]")


def _dataset_rows(ds: Any, name: str) -> list[Row]:
    return [Row(f"{name}: row {i}", r) for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- renaming


def column_map(columns: Any) -> dict[str, str]:
    """``data.columns`` as {canonical: file column}, without the unset (null) entries."""
    if not columns:
        return {}
    items = columns.items() if hasattr(columns, "items") else vars(columns).items()
    return {str(k): str(v) for k, v in items if v is not None and str(v) != str(k)}


def rename_columns(rows: list[Row], columns: Any) -> list[Row]:
    """Rows with their file columns renamed to the canonical names ``data.columns`` gives.

    A row that lacks a renamed column is an error naming the line and the setting; a row that
    already has the canonical name as well is ambiguous, and an error too.
    """
    mapping = column_map(columns)
    if not mapping:
        return rows
    out = []
    for r in rows:
        d = dict(r.data)
        for canonical, src in mapping.items():
            if src not in d:
                have = ", ".join(sorted(map(str, r.data))) or "nothing"
                raise AlignError(
                    f"{r.where}: missing column {src!r} (data.columns.{canonical}={src}; the row has: {have})"
                )
            if canonical in d:
                raise AlignError(
                    f"{r.where}: has both {src!r} and {canonical!r}, and data.columns.{canonical}={src} would "
                    f"make them one column; drop one, or unset data.columns.{canonical}"
                )
            d[canonical] = d.pop(src)
        out.append(Row(r.where, d))
    return out


# --------------------------------------------------------------------------- validation


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(row: Row, label: str, value: str) -> str:
    """A non-empty string that can be stored as UTF-8 (JSON's "\ud800" escapes can make one that cannot)."""
    if not value.strip():
        raise AlignError(f"{row.where}: {label} is empty")
    bad = _SURROGATE.search(value)
    if bad:
        raise AlignError(
            f"{row.where}: {label} holds a lone surrogate \\u{ord(bad.group()):04x} (a broken \\u escape), "
            "which is not text; fix or drop the row"
        )
    return value


def _text_or_messages(row: Row, key: str, roles: tuple[str, ...] | None = None) -> str | list[dict]:
    if key not in row.data:
        have = ", ".join(sorted(map(str, row.data))) or "nothing"
        raise AlignError(f"{row.where}: missing column {key!r} (the row has: {have})")
    if row.data[key] is None:
        raise AlignError(f"{row.where}: {key!r} is empty (null)")
    value = row.data[key]
    if isinstance(value, str):
        return _text(row, repr(key), value)
    if isinstance(value, list):
        if not value:
            raise AlignError(f"{row.where}: {key!r} is an empty list of messages")
        msgs = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise AlignError(f"{row.where}: {key}[{i}] must be an object with 'role' and 'content'")
            if not isinstance(m["role"], str) or m["role"] not in (roles or ROLES):
                raise AlignError(
                    f"{row.where}: {key}[{i}] has unknown role {m['role']!r}; use one of {', '.join(roles or ROLES)}"
                )
            if not isinstance(m["content"], str):
                raise AlignError(
                    f"{row.where}: {key}[{i}] ({m['role']}) content must be a string, not {_type(m['content'])}"
                )
            msgs.append(
                {"role": m["role"], "content": _text(row, f"{key}[{i}] ({m['role']}) content", m["content"])}
            )
        return msgs
    raise AlignError(f"{row.where}: {key!r} must be a string or a list of messages, not {_type(value)}")


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def preference_row(row: Row) -> dict[str, Any]:
    chosen = _text_or_messages(row, "chosen")
    rejected = _text_or_messages(row, "rejected")
    prompt = _text_or_messages(row, "prompt")  # an implicit prompt was made explicit by align.formats
    if isinstance(prompt, list) != isinstance(chosen, list) or isinstance(chosen, list) != isinstance(
        rejected, list
    ):
        raise AlignError(
            f"{row.where}: prompt, chosen and rejected must all be strings or all be message lists"
        )
    if chosen == rejected:
        raise AlignError(f"{row.where}: 'chosen' is identical to 'rejected'; a pair must differ")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in row.data:  # stage=rm: how much better chosen is (RewardTrainer's margin loss)
        margin = row.data["margin"]
        if isinstance(margin, str):  # a CSV cell
            try:
                margin = float(margin)
            except ValueError:
                pass
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise AlignError(f"{row.where}: 'margin' must be a finite number, got {margin!r}")
        out["margin"] = float(margin)
    return out


def sft_row(row: Row) -> dict[str, Any]:
    d = row.data
    if "messages" in d:
        msgs = _text_or_messages(row, "messages")
        if isinstance(msgs, str) or msgs[-1]["role"] != "assistant":
            raise AlignError(
                f"{row.where}: 'messages' must end with an assistant turn (the response to learn)"
            )
        if len(msgs) < 2:
            raise AlignError(
                f"{row.where}: 'messages' needs at least one turn before the assistant's response"
            )
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    if "prompt" in d or "completion" in d:
        prompt = _text_or_messages(row, "prompt")
        completion = _text_or_messages(row, "completion")
        if isinstance(prompt, list) != isinstance(completion, list):
            raise AlignError(f"{row.where}: prompt and completion must both be strings or both message lists")
        return {"prompt": prompt, "completion": completion}
    if "text" in d:
        text = _text_or_messages(row, "text")
        if not isinstance(text, str):
            raise AlignError(f"{row.where}: 'text' must be a string; a conversation goes in 'messages'")
        return {"text": text}
    have = ", ".join(sorted(d)) or "nothing"
    raise AlignError(
        f"{row.where}: an SFT row needs 'messages', 'prompt'+'completion' or 'text' (the row has: {have})"
    )


def prompt_row(row: Row) -> dict[str, Any]:
    out = {"prompt": _text_or_messages(row, "prompt")}
    for key in ("constraints", "id"):
        if key in row.data:
            value = row.data[key]
            value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            out[key] = _SURROGATE.sub("\ufffd", value)  # an opaque label: stored, never tokenized
    return out


def label_key(value: Any) -> str | None:
    """The canonical name of a class label: ints (and integral floats) as digits, bools and
    "true"/"false" as true/false, other strings stripped. None: not a usable label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        v = value.strip()
        if not v or _SURROGATE.search(v):
            return None
        if v.lower() in ("true", "false"):
            return v.lower()
        if re.fullmatch(r"[+-]?\d+", v):
            return str(int(v))
        return v
    return None


def classify_row(row: Row) -> dict[str, Any]:
    d = row.data
    if "text" not in d:
        have = ", ".join(sorted(map(str, d))) or "nothing"
        raise AlignError(
            f"{row.where}: missing column 'text' (the row has: {have}); name another column with "
            "data.columns.text=<column>"
        )
    if not isinstance(d["text"], str):
        raise AlignError(f"{row.where}: 'text' must be a string, not {_type(d['text'])}")
    out: dict[str, Any] = {"text": _text(row, "'text'", d["text"])}
    if "label" not in d:
        have = ", ".join(sorted(map(str, d))) or "nothing"
        raise AlignError(
            f"{row.where}: missing column 'label' (the row has: {have}); name another column with "
            "data.columns.label=<column>"
        )
    if d["label"] is None:
        raise AlignError(f"{row.where}: 'label' is empty (null)")
    key = label_key(d["label"])
    if key is None:
        raise AlignError(
            f"{row.where}: 'label' must be an integer, true/false or a non-empty string, got {d['label']!r}"
        )
    out["label"] = key
    if "weight" in d:
        w = d["weight"]
        if isinstance(w, str):  # a CSV cell
            try:
                w = float(w)
            except ValueError:
                pass
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise AlignError(f"{row.where}: 'weight' must be a finite number >= 0, got {d['weight']!r}")
        out["weight"] = float(w)
    out["where"] = row.where
    if "id" in d and d["id"] is not None:
        out["id"] = _SURROGATE.sub("\ufffd", d["id"] if isinstance(d["id"], str) else json.dumps(d["id"]))
    return out


def _label(row: Row) -> bool:
    """An unpaired row's ``label``: true/false (also as a CSV cell "true"/"false") or 1/0."""
    value = row.data.get("label")
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise AlignError(
        f"{row.where}: 'label' must be true (a desirable completion) or false (an undesirable one), "
        f"got {value!r}"
    )


def unpaired_row(row: Row) -> dict[str, Any]:
    prompt = _text_or_messages(row, "prompt")
    completion = _text_or_messages(row, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise AlignError(f"{row.where}: prompt and completion must both be strings or both message lists")
    if "label" not in row.data or row.data["label"] is None:
        raise AlignError(f"{row.where}: missing column 'label' (true: desirable, false: undesirable)")
    return {"prompt": prompt, "completion": completion, "label": _label(row)}


def unpair(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unpaired rows from preference pairs: each pair's chosen is a desirable row, its rejected an
    undesirable one. Two pairs at a time they go in the order chosen a, chosen b, rejected a,
    rejected b, so every batch of 4 (in order: KTO samples sequentially) holds two of each, and no
    row follows one with the same prompt: KTO's KL estimate pairs each prompt with the completion
    of the row before it, which must answer another prompt."""
    out: list[dict[str, Any]] = []

    def row(p: dict[str, Any], key: str) -> dict[str, Any]:
        return {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}

    for i in range(0, len(pairs), 2):
        two = pairs[i : i + 2]
        out += [row(p, "chosen") for p in two] + [row(p, "rejected") for p in two]
    return out


CONVERTERS = {
    "preference": preference_row,
    "sft": sft_row,
    "prompt": prompt_row,
    "classify": classify_row,
    "unpaired": unpaired_row,
}


def validate_rows(rows: list[Row], kind: str, columns: Any = None) -> list[dict[str, Any]]:
    return [d for _, d in _validated(rename_columns(rows, columns), kind, skip=False, dropped=[])]


def _validated(
    rows: list[Row], kind: str, *, skip: bool, dropped: list[str], report: dict[str, Any] | None = None
) -> list[tuple[str, dict]]:
    """(where, row) pairs; with ``skip`` a malformed row is dropped and noted in ``dropped``.

    The file's layout is detected first (align.formats) and each row converted from it to
    the canonical columns; ``report`` (if given) gets the format's name and the row counts.
    Every kept row has the columns of the first, each holding the same form (text or messages):
    one dataset column cannot hold both, and a trainer cannot tokenize a mix.
    """
    # ---- format hook (align/formats.py): which layout the file is in, and each row in canonical columns
    fmt = formats.detect(rows, kind)  # refuses a file that matches no format or several

    def canonical(r: Row) -> Row:
        return Row(r.where, formats.convert(r, fmt))

    # ---- end of the format hook
    convert = CONVERTERS[fmt.kind]  # a kind may read another kind's layouts (unpaired: pairs too)
    out: list[tuple[str, dict]] = []
    first: tuple[str, dict[str, str]] | None = None
    skipped = 0
    for r in rows:
        try:
            row = convert(canonical(r))
            shape = {k: _form(v) for k, v in row.items()}
            if first is None:
                first = (r.where, shape)
            elif shape != first[1]:
                raise AlignError(
                    f"{r.where}: this row has {_describe(shape)}, but {first[0]} has {_describe(first[1])}; "
                    "every row must have the same columns, each all text or all message lists"
                )
            out.append((r.where, row))
        except AlignError as e:
            if not skip:
                raise
            dropped.append(str(e))
            skipped += 1
    if report is not None:
        report.update(format=fmt.name, read=len(rows), converted=len(out), skipped=skipped)
    return out


def _form(value: Any) -> str:
    return "messages" if isinstance(value, list) else "text" if isinstance(value, str) else "number"


def _describe(shape: dict[str, str]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(shape.items()))


def _prompt_tokens(row: dict[str, Any], tokenizer: Any) -> int:
    prompt = row.get("prompt")
    if prompt is None:  # plain text rows have no prompt
        return 0
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _fitting(
    rows: list[tuple[str, dict]],
    tokenizer: Any,
    max_length: int,
    *,
    skip: bool,
    dropped: list[str],
    limit: int | None,
) -> list[dict[str, Any]]:
    """The rows whose prompt leaves room for a response within ``max_length`` tokens (up to ``limit``)."""
    out = []
    for where, row in rows:
        if limit is not None and len(out) >= limit:
            break
        n = _prompt_tokens(row, tokenizer)
        if n >= max_length:
            msg = (
                f"{where}: the prompt is {n} tokens, longer than model.max_length={max_length} (no room for "
                "the response); raise model.max_length, shorten the row, or set data.on_error=skip to drop such rows"
            )
            if not skip:
                raise AlignError(msg)
            dropped.append(msg)
            continue
        out.append(row)
    return out


# --------------------------------------------------------------------------- loading


def source_paths(data_cfg: Any, kind: str) -> tuple[str, str | None]:
    """(train source, held-out source or None) for ``kind`` under the data config."""
    if data_cfg.train:
        return data_cfg.train, data_cfg.eval
    key = (data_cfg.name, kind)
    if key not in SHIPPED:
        names = sorted({n for n, k in SHIPPED if k == kind})
        raise AlignError(
            f"data.name={data_cfg.name!r} has no {kind} data; use one of {', '.join(names)} or set data.train=<file>"
        )
    train, held_out = SHIPPED[key]
    base = classify_data_dir() if kind == "classify" else reward_data_dir()
    return str(base / train), data_cfg.eval or (str(base / held_out) if held_out else None)


def load(
    data_cfg: Any,
    kind: str,
    *,
    seed: int,
    needed_train_rows: int | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    as_dataset: bool = True,
) -> Split:
    """Validated train and held-out datasets of ``kind`` (sft | preference | prompt | classify |
    unpaired; an unpaired load splits pairs into rows after the held-out split, and its row caps
    count those rows).

    ``as_dataset=False`` gives the rows as lists of dicts instead of disk-backed Datasets, for
    a stage that only iterates them (PPO): it never imports ``datasets`` (~90 MB of RSS).

    ``needed_train_rows`` (from train.max_steps) caps how many shuffled rows are kept, so
    a short run does not tokenize a whole corpus it will never see. With ``tokenizer`` and
    ``max_length``, a row whose prompt alone fills ``max_length`` tokens is an error, or,
    with ``data.on_error=skip``, dropped (like a malformed row) and counted.
    """
    skip = str(getattr(data_cfg.on_error, "value", data_cfg.on_error)) == "skip"
    dropped: list[str] = []
    train_src, eval_src = source_paths(data_cfg, kind)
    subset = getattr(data_cfg, "subset", None)
    columns = getattr(data_cfg, "columns", None)

    def rows_of(src: str, report: dict[str, Any]) -> list:
        """``src``'s rows, columns renamed, format detected and converted, validated."""
        rows = rename_columns(read_rows(src, data_cfg.split, subset), columns)
        return _validated(rows, kind, skip=skip, dropped=dropped, report=report)

    train_report: dict[str, Any] = {}
    eval_report: dict[str, Any] = {}
    train_rows = rows_of(train_src, train_report)
    if not train_rows:
        raise AlignError(f"{train_src}: no rows" + (f" left ({len(dropped)} dropped)" if dropped else ""))
    rng = random.Random(seed)
    rng.shuffle(train_rows)
    if eval_src:
        eval_rows = rows_of(eval_src, eval_report)
    elif data_cfg.eval_fraction > 0 and len(train_rows) >= 2:
        n_eval = max(1, round(len(train_rows) * data_cfg.eval_fraction))
        eval_rows, train_rows = train_rows[:n_eval], train_rows[n_eval:]
    else:
        eval_rows = []
    caps = [c for c in (data_cfg.max_train_rows, needed_train_rows) if c]
    if tokenizer is not None and max_length:
        fit = dict(skip=skip, dropped=dropped)
        train_rows = _fitting(train_rows, tokenizer, max_length, limit=min(caps) if caps else None, **fit)
        eval_rows = _fitting(eval_rows, tokenizer, max_length, limit=data_cfg.max_eval_rows or None, **fit)
    else:
        train_rows = [r for _, r in train_rows][: min(caps) if caps else None]
        eval_rows = [r for _, r in eval_rows][: data_cfg.max_eval_rows or None]
    if not train_rows:
        raise AlignError(f"{train_src}: no usable rows ({len(dropped)} dropped; first: {dropped[0]})")
    split_pairs = kind == "unpaired" and "chosen" in train_rows[0]
    if kind == "unpaired":  # pairs (after the held-out split, so both halves stay on one side)
        train_rows = _unpaired(train_rows)[: min(caps) if caps else None]
        eval_rows = _unpaired(eval_rows)[: data_cfg.max_eval_rows or None]
    info = {"train": train_src, "eval": eval_src or f"{data_cfg.eval_fraction:.0%} of train"}
    info |= {"train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    info |= _format_info(train_report, eval_report)
    if dropped:
        info["dropped_rows"] = len(dropped)
    if split_pairs:
        info["pairs_split"] = True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"align: data: {format_line(info)}", file=sys.stderr, flush=True)
        if dropped:
            print(
                f"align: data: dropped {len(dropped)} row(s) (data.on_error=skip); first: {dropped[0]}",
                file=sys.stderr,
                flush=True,
            )
    if not as_dataset:
        return Split(train=train_rows, eval=eval_rows or None, info=info)
    return Split(
        train=cached_dataset(train_rows), eval=cached_dataset(eval_rows) if eval_rows else None, info=info
    )


def _unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` as unpaired rows: pairs are split (:func:`unpair`), unpaired rows kept."""
    return unpair(rows) if rows and "chosen" in rows[0] else rows


def _row_form(row: dict[str, Any]) -> str:
    if "text" in row:
        return "text"
    return "conversational" if isinstance(row.get("prompt"), list) else "prompt/completion strings"


def mix_replay(
    split: Split,
    data_cfg: Any,
    *,
    seed: int,
    fixed_budget: bool,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> Split:
    """``data.replay``: general SFT rows mixed into ``split.train`` so that they make
    ``data.replay_fraction`` of it, deterministically (seeded). With ``fixed_budget`` (train.max_steps
    set: the rows a run consumes) replay rows replace task rows, so the step count stays; otherwise
    (whole epochs) they are added, so no task row is lost. Replay rows are sampled without repetition
    while the file lasts, then cycled. The split's info records the file and the counts."""
    src, f = str(data_cfg.replay), float(data_cfg.replay_fraction)
    skip = str(getattr(data_cfg.on_error, "value", data_cfg.on_error)) == "skip"
    dropped: list[str] = []
    replay = _validated(read_rows(src), "sft", skip=skip, dropped=dropped, report={})
    if tokenizer is not None and max_length:
        replay = _fitting(replay, tokenizer, max_length, skip=True, dropped=dropped, limit=None)
    else:
        replay = [r for _, r in replay]
    if not replay:
        raise AlignError(f"data.replay={src}: no usable SFT rows ({len(dropped)} dropped)")
    task = [dict(r) for r in split.train]
    want, have = _row_form(task[0]), _row_form(replay[0])
    if want != have:
        raise AlignError(
            f"data.replay={src}: its rows are {have}, the training rows are {want}; give a replay file in the "
            "same form (e.g. both as 'messages')"
        )
    rng = random.Random(seed + 7919)
    if fixed_budget:
        n_replay = round(len(task) * f)
        task = task[: len(task) - n_replay]
    else:
        n_replay = round(len(task) * f / (1.0 - f))
    order = list(range(len(replay)))
    picked: list[dict[str, Any]] = []
    while len(picked) < n_replay:
        rng.shuffle(order)
        picked += [replay[i] for i in order[: n_replay - len(picked)]]
    keys = set(task[0])
    picked = [{k: r.get(k) for k in keys} for r in picked]
    mixed = task + picked
    rng.shuffle(mixed)
    info = dict(split.info)
    info |= {
        "replay": src,
        "replay_rows": n_replay,
        "replay_fraction": n_replay / len(mixed) if mixed else 0.0,
        "task_rows": len(task),
        "train_rows": len(mixed),
    }
    return Split(train=cached_dataset(mixed), eval=split.eval, info=info)


def replay_line(info: dict[str, Any]) -> str:
    """One line for the run summary: how many general rows data.replay mixed in."""
    return (
        f"{info['replay_rows']} of {info['train_rows']} training rows ({info['replay_fraction']:.1%}) from "
        f"{info['replay']}, {info['task_rows']} task rows"
    )


def _format_info(train: dict[str, Any], held_out: dict[str, Any]) -> dict[str, Any]:
    """What artifact.json records of the detected formats and the rows read, converted and skipped.

    ``rows_skipped`` counts the rows that failed conversion or validation (data.on_error=skip);
    ``dropped_rows`` also counts the rows dropped later for an over-long prompt."""
    out: dict[str, Any] = {"format": train["format"]}
    if held_out and held_out["format"] != train["format"]:
        out["eval_format"] = held_out["format"]
    for key in ("read", "converted", "skipped"):
        out[f"rows_{key}"] = train[key] + held_out.get(key, 0)
    return out


def format_line(info: dict[str, Any]) -> str:
    """One line for the console: ``<file>: format hh-rlhf; 160 rows read, 157 converted, 3 skipped``."""
    fmt = info["format"] + (f" (held-out file: {info['eval_format']})" if "eval_format" in info else "")
    skipped = info.get("rows_skipped", 0)
    too_long = info.get("dropped_rows", 0) - skipped
    counts = f"{info['rows_read']} rows read, {info['rows_converted']} converted"
    counts += f", {skipped} skipped (data.on_error=skip)" if skipped else ""
    counts += f", {too_long} dropped for a prompt over model.max_length" if too_long > 0 else ""
    if info.get("pairs_split"):
        counts += (
            f"; each pair split into a desirable and an undesirable row ({info['train_rows']} train rows)"
        )
    return f"{info['train']}: format {fmt}; {counts}"


def cached_dataset(rows: list[dict[str, Any]]):
    """A disk-backed Dataset of ``rows`` under the align cache, keyed by their content.

    Being disk-backed makes every ``map`` the trainers run on it (tokenization, TRL's
    precomputed reference log-probs) land in cache files beside it, so a rerun or a sweep
    over the same rows reuses them instead of recomputing.
    """
    from datasets import Dataset, load_from_disk

    key = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    target = cache_root() / "datasets" / key
    if not (target / "dataset_info.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{key}-{os.getpid()}")
        Dataset.from_list(rows).save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))
