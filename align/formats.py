"""Dataset layouts people have, detected per file and converted to align's canonical rows.

``data.py`` reads a file into raw rows; this module says which known layout the file is in
(:func:`detect`) and maps each raw row onto the canonical columns (:func:`convert`), which
``data.py`` then validates:

* preference: ``prompt`` + ``chosen`` + ``rejected`` (+ optional ``margin``)
* sft: ``messages``, ``prompt`` + ``completion``, or ``text``
* prompt: ``prompt`` (+ ``constraints``, ``id``)
* unpaired (kto): ``prompt`` + ``completion`` + ``label`` (desirable or not); a file of pairs
  (any preference layout) is accepted too, and data.py splits each pair into two such rows

A file is detected from the columns its rows have (a null counts as absent): each row
matches the formats whose required columns it has; a format whose columns include
another's wins over it (``prompt``/``chosen``/``rejected`` beats the implicit-prompt
``chosen``/``rejected``), rating columns make a pair UltraFeedback with or without a
``prompt``, plain ``text`` only applies when nothing else does, and the HH-RLHF
transcript layout refines the implicit-prompt one by the rows' values. The layout
most rows match is the file's; a row that does not fit it is a bad row naming its line.
A file whose rows mostly match no format, or several, is refused with the accepted list.

No module here reads files or knows about trainers; errors are ``AlignError`` naming the row.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from align.errors import AlignError

# Which stages read each row kind (for messages).
STAGES = {
    "preference": "dpo, rm, orpo, simpo",
    "sft": "sft",
    "prompt": "grpo, rloo, ppo, eval",
    "classify": "classify",
    "unpaired": "kto",
}
# The canonical columns of each row kind: what data.columns.<canonical>=<file column> can name.
CANONICAL = {
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "sft": ("prompt", "completion", "messages", "text"),
    "prompt": ("prompt", "constraints", "id"),
    "classify": ("text", "label", "weight", "id"),
    "unpaired": ("prompt", "completion", "label", "chosen", "rejected"),
}
# A row kind that also reads the layouts of other kinds (converted to its own rows by data.py).
ALSO_ACCEPTS = {"unpaired": ("preference",)}


@dataclass(frozen=True)
class Format:
    name: str  # recorded in artifact.json ("format") and printed in the run summary
    kind: str  # row kind: preference | sft | prompt
    columns: tuple[str, ...]  # required columns
    convert: Callable[[Any], dict[str, Any]]  # raw Row -> canonical columns (validated by data.py)
    canonical: bool = False  # rows already have the canonical columns: nothing is converted
    fallback: bool = False  # applies only when no other format matches (plain ``text``)
    looks: Callable[[dict[str, Any]], bool] | None = None  # refines a format with the same columns
    beats: tuple[str, ...] = ()  # formats this one wins over where both match


# --------------------------------------------------------------------------- helpers


def _have(row: Any) -> str:
    return ", ".join(sorted(map(str, row.data))) or "nothing"


def _get(row: Any, key: str, types: tuple[type, ...] = (str, list)) -> Any:
    """``row[key]`` if it has one of ``types``; an AlignError naming the row otherwise."""
    d = row.data
    if key not in d:
        raise AlignError(f"{row.where}: missing column {key!r} (the row has: {_have(row)})")
    value = d[key]
    if value is None:
        raise AlignError(f"{row.where}: {key!r} is empty (null)")
    if not isinstance(value, types):
        want = " or ".join({str: "a string", list: "a list of messages"}.get(t, t.__name__) for t in types)
        raise AlignError(f"{row.where}: {key!r} must be {want}, not {type(value).__name__}")
    return value


def _pick(row: Any, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The columns ``keys`` (each required) and ``optional`` of a row; data.py validates the values."""
    for k in keys:
        if k not in row.data:
            raise AlignError(f"{row.where}: missing column {k!r} (the row has: {_have(row)})")
    return {k: row.data[k] for k in (*keys, *optional) if k in row.data}


def _shared_turns(chosen: list, rejected: list) -> int:
    """How many leading messages chosen and rejected share (each keeps at least one)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def _role(m: Any) -> str:
    return str(m.get("role")) if isinstance(m, dict) else "?"


def _responses_only(row: Any, chosen: list, rejected: list, n: int) -> None:
    """Refuse a pair whose messages after the shared ``n`` hold a user or system turn: its prompts differ."""
    for rest in (chosen[n:], rejected[n:]):
        for i, m in enumerate(rest, start=n):
            if _role(m) in ("user", "system"):
                raise AlignError(
                    f"{row.where}: the prompts of 'chosen' and 'rejected' differ (message {i}, {_role(m)}, "
                    "is not the same in both); a pair must answer the same prompt"
                )


def _split_turns(row: Any, chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen response, rejected response) of two conversations: the prompt is
    their shared leading messages; what follows must be the responses (no user/system turn)."""
    n = _shared_turns(chosen, rejected)
    _responses_only(row, chosen, rejected, n)
    if n == 0:
        raise AlignError(
            f"{row.where}: 'chosen' and 'rejected' share no leading messages, so there is no prompt; "
            "add a 'prompt' column"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _split_text(row: Any, chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response): the prompt is the longest shared prefix
    of the two texts, cut back to a word boundary (spaces before the response go with it)."""
    i = len(os.path.commonprefix([chosen, rejected]))
    while i > 0 and not chosen[i - 1].isspace():
        i -= 1
    while i > 0 and chosen[i - 1] in " \t":
        i -= 1
    if not chosen[:i].strip():
        raise AlignError(
            f"{row.where}: 'chosen' and 'rejected' share no leading text, so there is no prompt "
            "(their prompts differ, or the prompt is missing); add a 'prompt' column"
        )
    return chosen[:i], chosen[i:], rejected[i:]


# --------------------------------------------------------------------------- preference


def _explicit(row: Any) -> dict[str, Any]:
    return _pick(row, ("prompt", "chosen", "rejected"), ("margin",))


def _implicit(row: Any) -> dict[str, Any]:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_turns(row, chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = _split_text(row, chosen, rejected)
    else:
        raise AlignError(f"{row.where}: 'chosen' and 'rejected' must both be text or both be message lists")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected} | _pick(row, (), ("margin",))


_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _looks_hh(d: dict[str, Any]) -> bool:
    c = d.get("chosen")
    return isinstance(c, str) and re.match(r"\s*Human:", c) is not None and "\n\nAssistant:" in c


def _transcript(row: Any, key: str) -> list[dict[str, str]]:
    """The turns of an HH-RLHF transcript ``\\n\\nHuman: ...\\n\\nAssistant: ...``."""
    text = _get(row, key, (str,))
    parts = _HH_TURN.split(text)
    turns = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    turns += [
        {"role": _HH_ROLE[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise AlignError(
            f"{row.where}: {key!r} is not a transcript that ends with the response "
            "('\\n\\nHuman: ...\\n\\nAssistant: ...')"
        )
    return turns


def _hh(row: Any) -> dict[str, Any]:
    chosen, rejected = _transcript(row, "chosen"), _transcript(row, "rejected")
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        i = next(
            (i for i, (a, b) in enumerate(zip(prompt, rejected[:-1], strict=False)) if a != b),
            min(len(prompt), len(rejected) - 1),
        )
        raise AlignError(
            f"{row.where}: the prompts of 'chosen' and 'rejected' differ (turn {i + 1} is not the same in both); "
            "a pair must answer the same prompt"
        )
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns[-1]["content"]:
            raise AlignError(f"{row.where}: {key!r}: the last Assistant turn (the response) is empty")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _rating(row: Any, key: str) -> float:
    value = row.data.get(key)
    if isinstance(value, str):  # a CSV cell
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AlignError(f"{row.where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _ultrafeedback(chosen_key: str, rejected_key: str) -> Callable[[Any], dict[str, Any]]:
    def convert(row: Any) -> dict[str, Any]:
        chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
        if "prompt" not in row.data:  # e.g. trl-lib/ultrafeedback_binarized: the prompt is implicit
            pair = _implicit(row)
            prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        elif isinstance(chosen, list) and isinstance(rejected, list) and _shared_turns(chosen, rejected):
            # the conversations hold the prompt (the 'prompt' column repeats it)
            prompt, chosen, rejected = _split_turns(row, chosen, rejected)
        else:
            prompt = _get(row, "prompt")
            if isinstance(chosen, list) and isinstance(rejected, list):
                _responses_only(row, chosen, rejected, 0)  # e.g. [user A, assistant] vs [user B, assistant]
            if isinstance(chosen, list) and isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
        good, bad = _rating(row, chosen_key), _rating(row, rejected_key)
        if good < bad:
            raise AlignError(
                f"{row.where}: {chosen_key!r} ({good:g}) is below {rejected_key!r} ({bad:g}): "
                "chosen is rated worse than rejected; swap them or drop the row"
            )
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": good - bad}

    return convert


# --------------------------------------------------------------------------- sft


_SHAREGPT_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
}


def _messages(row: Any) -> dict[str, Any]:
    return _pick(row, ("messages",))


def _sharegpt(row: Any) -> dict[str, Any]:
    turns = _get(row, "conversations", (list,))
    msgs = []
    for i, t in enumerate(turns):
        who, value = (
            (t.get("from", t.get("role")), t.get("value", t.get("content")))
            if isinstance(t, dict)
            else (None, None)
        )
        if who is None or value is None:
            raise AlignError(f"{row.where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLE.get(who) if isinstance(who, str) else None
        if role is None:
            raise AlignError(
                f"{row.where}: conversations[{i}] has unknown 'from' {who!r}; use human, gpt or system"
            )
        if not isinstance(value, str):
            raise AlignError(
                f"{row.where}: conversations[{i}] ({who}) value must be a string, not {type(value).__name__}"
            )
        if not value.strip():
            raise AlignError(f"{row.where}: conversations[{i}] ({who}) value is empty")
        msgs.append({"role": role, "content": value})
    return {"messages": _system(row) + msgs}


def _system(row: Any) -> list[dict[str, str]]:
    """A row-level ``system`` column (LLaMA-Factory's alpaca and sharegpt layouts) as a system turn."""
    system = row.data.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    if not isinstance(system, str):
        raise AlignError(f"{row.where}: 'system' must be a string, not {type(system).__name__}")
    return [{"role": "system", "content": system}]


def _history(row: Any) -> list[dict[str, str]]:
    """Alpaca's optional ``history``: earlier [instruction, response] rounds, as turns."""
    history = row.data.get("history")
    if history is None:
        return []
    turns = []
    for i, pair in enumerate(history if isinstance(history, list) else [None]):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise AlignError(f"{row.where}: history[{i}] must be an [instruction, response] pair of strings")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _alpaca(row: Any) -> dict[str, Any]:
    instruction, output = _get(row, "instruction", (str,)), _get(row, "output", (str,))
    extra = row.data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise AlignError(f"{row.where}: 'input' must be a string, not {type(extra).__name__}")
    for key, value in (("instruction", instruction), ("output", output)):
        if not value.strip():
            raise AlignError(f"{row.where}: {key!r} is empty")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": _system(row) + _history(row) + turns}


# --------------------------------------------------------------------------- the table


FORMATS: tuple[Format, ...] = (
    Format(
        "prompt-chosen-rejected",
        "preference",
        ("prompt", "chosen", "rejected"),
        _explicit,
        canonical=True,
    ),
    Format(
        "implicit-prompt",
        "preference",
        ("chosen", "rejected"),
        _implicit,
    ),
    Format(
        "hh-rlhf",
        "preference",
        ("chosen", "rejected"),
        _hh,
        looks=_looks_hh,
    ),
    Format(
        "ultrafeedback",
        "preference",
        ("chosen", "rejected", "chosen-rating", "rejected-rating"),
        _ultrafeedback("chosen-rating", "rejected-rating"),
        beats=("prompt-chosen-rejected", "implicit-prompt", "hh-rlhf"),
    ),
    Format(
        "ultrafeedback-scores",
        "preference",
        ("chosen", "rejected", "score_chosen", "score_rejected"),
        _ultrafeedback("score_chosen", "score_rejected"),
        beats=("prompt-chosen-rejected", "implicit-prompt", "hh-rlhf"),
    ),
    Format(
        "prompt-completion",
        "sft",
        ("prompt", "completion"),
        lambda row: _pick(row, ("prompt", "completion")),
        canonical=True,
    ),
    Format(
        "messages",
        "sft",
        ("messages",),
        _messages,
    ),
    Format(
        "sharegpt",
        "sft",
        ("conversations",),
        _sharegpt,
    ),
    Format(
        "alpaca",
        "sft",
        ("instruction", "output"),
        _alpaca,
    ),
    Format(
        "text",
        "sft",
        ("text",),
        lambda row: _pick(row, ("text",)),
        canonical=True,
        fallback=True,
    ),
    Format(
        "prompt",
        "prompt",
        ("prompt",),
        lambda row: row.data,
        canonical=True,
    ),
    Format(
        "prompt-completion-label",
        "unpaired",
        ("prompt", "completion", "label"),
        lambda row: _pick(row, ("prompt", "completion", "label")),
        canonical=True,
    ),
    Format(  # one layout (after data.columns); data.classify_row names what a row lacks
        "classify",
        "classify",
        (),
        lambda row: row.data,
        canonical=True,
    ),
)

BY_NAME = {f.name: f for f in FORMATS}


def formats_for(kind: str) -> list[Format]:
    kinds = (kind, *ALSO_ACCEPTS.get(kind, ()))
    return [f for f in FORMATS if f.kind in kinds]


def matching(data: dict[str, Any], kind: str) -> tuple[str, ...]:
    """Names of the ``kind`` formats a raw row matches, after the more specific ones win."""
    have = {k for k, v in data.items() if v is not None}
    cands = [f for f in formats_for(kind) if set(f.columns) <= have and (f.looks is None or f.looks(data))]
    if any(not f.fallback for f in cands):
        cands = [f for f in cands if not f.fallback]
    keep = []
    for f in cands:
        beaten = any(
            set(f.columns) < set(g.columns)
            or (set(f.columns) == set(g.columns) and g.looks and not f.looks)
            or f.name in g.beats
            for g in cands
            if g is not f
        )
        if not beaten:
            keep.append(f.name)
    return tuple(keep)


def accepted(kind: str) -> str:
    """The accepted formats of ``kind`` in one line: name (columns); ..."""
    return "; ".join(f"{f.name} ({', '.join(f.columns)})" for f in formats_for(kind))


def detect(rows: list[Any], kind: str) -> Format:
    """The format of a file's raw rows (``Row``: ``where``, ``data``): the one most rows match.

    Refused (AlignError naming the first such row) when that is no format or several."""
    if not rows:
        return next(f for f in formats_for(kind) if f.canonical)
    seen: Counter[tuple[str, ...]] = Counter()
    first: dict[tuple[str, ...], Any] = {}
    for r in rows:
        m = matching(r.data, kind)
        seen[m] += 1
        first.setdefault(m, r)
    best, _ = seen.most_common(1)[0]  # ties: the one met first
    if len(best) == 1:
        return BY_NAME[best[0]]
    row = first[best]
    cols = ", ".join(sorted(k for k, v in row.data.items() if v is not None)) or "none"
    what = f"several {kind} formats ({', '.join(best)})" if best else f"no {kind} format"
    raise AlignError(
        f"{row.where}: cannot tell the data format: the columns ({cols}) match {what}. "
        f"Formats accepted for stage {STAGES[kind]}: {accepted(kind)}. "
        f"Map your columns onto the canonical ones ({', '.join(CANONICAL[kind])}) with "
        "data.columns.<canonical>=<your column> (e.g. data.columns.prompt=question), or drop the extra columns"
    )


def convert(row: Any, fmt: Format) -> dict[str, Any]:
    """``row``'s canonical columns under ``fmt`` (data.py validates them)."""
    return fmt.convert(row)
