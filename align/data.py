"""THE one place that reads datasets.

Files (.jsonl, .json, .parquet, .csv) or a hub dataset name go in; validated rows in the
shape TRL's trainers expect come out. Every malformed row fails with an AlignError that
names the file, the line (or row) and the problem.

Accepted row shapes:

* preference (dpo, rm): ``prompt`` + ``chosen`` + ``rejected``, each a string or a list
  of ``{"role", "content"}`` messages; or ``chosen``/``rejected`` conversations that
  share their leading turns (the shared turns become the prompt).
* sft: ``messages`` (the last assistant turn is the completion, the turns before it the
  prompt), ``prompt`` + ``completion``, or plain ``text``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.cache import cache_root
from align.errors import AlignError

ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# (data.name, row kind) -> (train file, held-out file or None) under reward_data/
SHIPPED = {
    ("ifeval", "sft"): ("sft_train.jsonl", None),
    ("ifeval", "preference"): ("pairs_train.jsonl", "pairs_test.jsonl"),
    ("ifeval", "prompt"): ("prompts_train.jsonl", "prompts_test.jsonl"),
    ("tiny", "sft"): ("tiny_sft.jsonl", None),
    ("tiny", "preference"): ("tiny_pairs.jsonl", None),
}


def reward_data_dir() -> Path:
    """The shipped data: reward_data/ in a checkout, align/reward_data in an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "reward_data", here.parent / "reward_data"):
        if (cand / "pairs_train.jsonl").is_file():
            return cand
    raise AlignError("the shipped reward_data/ directory is missing from this installation; reinstall align")


@dataclass
class Row:
    where: str  # "file:line" (or "file:row N")
    data: dict[str, Any]


@dataclass
class Split:
    train: Any  # datasets.Dataset
    eval: Any | None
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Raw rows of a file or hub dataset, each tagged with where it came from."""
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise AlignError(
                f"data file not found: {source} (set data.train=<path to .jsonl/.json/.parquet/.csv>)"
            )
        return _read_file(path)
    return _read_hub(source, split)


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AlignError(f"{name}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise AlignError(f"{name}:{n}: expected a JSON object, got {type(obj).__name__}")
                rows.append(Row(f"{name}:{n}", obj))
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AlignError(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise AlignError(f"{name}: expected a JSON array of objects (or {{'data': [...]}})")
        rows = []
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                raise AlignError(f"{name}: item {i}: expected a JSON object, got {type(item).__name__}")
            rows.append(Row(f"{name}: item {i}", item))
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            # line numbers count the header as line 1
            return [Row(f"{name}:{reader.line_num}", dict(r)) for r in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [Row(f"{name}: row {i}", r) for i, r in enumerate(table.to_pylist())]
    raise AlignError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _read_hub(name: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # offline, missing, gated: say what was asked for
        raise AlignError(f"cannot load hub dataset {name!r} (split {split!r}): {e}") from None
    return [Row(f"{name}[{split}]: row {i}", r) for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- validation


def _text_or_messages(row: Row, key: str, roles: tuple[str, ...] | None = None) -> str | list[dict]:
    if key not in row.data or row.data[key] is None:
        have = ", ".join(sorted(row.data)) or "nothing"
        raise AlignError(f"{row.where}: missing column {key!r} (the row has: {have})")
    value = row.data[key]
    if isinstance(value, str):
        if not value.strip():
            raise AlignError(f"{row.where}: {key!r} is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise AlignError(f"{row.where}: {key!r} is an empty list of messages")
        msgs = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise AlignError(f"{row.where}: {key}[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in (roles or ROLES):
                raise AlignError(
                    f"{row.where}: {key}[{i}] has unknown role {m['role']!r}; use one of {', '.join(roles or ROLES)}"
                )
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise AlignError(f"{row.where}: {key}[{i}] ({m['role']}) has empty content")
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs
    raise AlignError(
        f"{row.where}: {key!r} must be a string or a list of messages, not {type(value).__name__}"
    )


def _split_shared_prefix(row: Row, chosen: list[dict], rejected: list[dict]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise AlignError(f"{row.where}: missing column 'prompt' (and chosen/rejected share no leading turns)")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_row(row: Row) -> dict[str, Any]:
    chosen = _text_or_messages(row, "chosen")
    rejected = _text_or_messages(row, "rejected")
    if "prompt" in row.data:
        prompt = _text_or_messages(row, "prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_shared_prefix(row, chosen, rejected)
    else:
        raise AlignError(f"{row.where}: missing column 'prompt'")
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
        return {"text": _text_or_messages(row, "text")}
    have = ", ".join(sorted(d)) or "nothing"
    raise AlignError(
        f"{row.where}: an SFT row needs 'messages', 'prompt'+'completion' or 'text' (the row has: {have})"
    )


def prompt_row(row: Row) -> dict[str, Any]:
    out = {"prompt": _text_or_messages(row, "prompt")}
    for key in ("constraints", "id"):
        if key in row.data:
            value = row.data[key]
            out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


CONVERTERS = {"preference": preference_row, "sft": sft_row, "prompt": prompt_row}


def validate_rows(rows: list[Row], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _validated(rows, kind, skip=False, dropped=[])]


def _validated(rows: list[Row], kind: str, *, skip: bool, dropped: list[str]) -> list[tuple[str, dict]]:
    """(where, row) pairs; with ``skip`` a malformed row is dropped and noted in ``dropped``."""
    convert = CONVERTERS[kind]
    out = []
    for r in rows:
        try:
            out.append((r.where, convert(r)))
        except AlignError as e:
            if not skip:
                raise
            dropped.append(str(e))
    keysets = {tuple(sorted(o)) for _, o in out}
    if len(keysets) > 1:
        first = out[0][0]
        raise AlignError(f"rows mix different formats ({' vs '.join(map(str, keysets))}); first row: {first}")
    return out


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
    base = reward_data_dir()
    return str(base / train), data_cfg.eval or (str(base / held_out) if held_out else None)


def load(
    data_cfg: Any,
    kind: str,
    *,
    seed: int,
    needed_train_rows: int | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> Split:
    """Validated train and held-out datasets of ``kind`` (sft | preference | prompt).

    ``needed_train_rows`` (from train.max_steps) caps how many shuffled rows are kept, so
    a short run does not tokenize a whole corpus it will never see. With ``tokenizer`` and
    ``max_length``, a row whose prompt alone fills ``max_length`` tokens is an error, or,
    with ``data.on_error=skip``, dropped (like a malformed row) and counted.
    """
    skip = str(getattr(data_cfg.on_error, "value", data_cfg.on_error)) == "skip"
    dropped: list[str] = []
    train_src, eval_src = source_paths(data_cfg, kind)
    train_rows = _validated(read_rows(train_src, data_cfg.split), kind, skip=skip, dropped=dropped)
    if not train_rows:
        raise AlignError(f"{train_src}: no rows" + (f" left ({len(dropped)} dropped)" if dropped else ""))
    rng = random.Random(seed)
    rng.shuffle(train_rows)
    if eval_src:
        eval_rows = _validated(read_rows(eval_src, data_cfg.split), kind, skip=skip, dropped=dropped)
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
    info = {"train": train_src, "eval": eval_src or f"{data_cfg.eval_fraction:.0%} of train"}
    info |= {"train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    if dropped:
        info["dropped_rows"] = len(dropped)
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"align: data: dropped {len(dropped)} row(s) (data.on_error=skip); first: {dropped[0]}",
                file=sys.stderr,
                flush=True,
            )
    return Split(
        train=cached_dataset(train_rows), eval=cached_dataset(eval_rows) if eval_rows else None, info=info
    )


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
