"""Check command-line overrides against the schema before Hydra composes anything.

Hydra already refuses a misspelt key or a wrong type, but with several lines of
``full_key/reference_type/object_type`` and a hint about ``HYDRA_FULL_ERROR``. Here the
same mistakes become one :class:`AlignError` that names the key and suggests the
nearest real key (``train.lrr`` -> ``train.lr``, ``beta`` -> ``dpo.beta``), the
expected type, or the options of a config group (``adapter=qlra`` -> ``qlora``).

Only the standard library, Hydra and OmegaConf are imported: this runs on every call.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode

from align.config import AlignConfig
from align.errors import AlignError

HINT = "(python -m align --cfg job shows every key)"


def _leaves(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys():
        child = node._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(child, DictConfig):
            out += _leaves(child, full + ".")
        out.append(full)
    return out


def _suggest(key: str, level_keys: list[str], prefix: str, all_keys: list[str]) -> str:
    last = key.split(".")[-1]
    close = difflib.get_close_matches(last, level_keys, n=1, cutoff=0.6)
    if close:
        return f"{prefix}{close[0]}"
    same_name = [k for k in all_keys if k.split(".")[-1] == last]
    if same_name:
        return " or ".join(same_name[:3])
    close = difflib.get_close_matches(key, all_keys, n=1, cutoff=0.7)
    return close[0] if close else ""


def _type_hint(node: Any) -> str:
    if isinstance(node, BooleanNode):
        return "true or false"
    if isinstance(node, IntegerNode):
        return "an integer"
    if isinstance(node, FloatNode):
        return "a number (e.g. 5e-5)"
    if isinstance(node, EnumNode):
        return "one of " + ", ".join(m.name for m in node.enum_type)
    return "a value of another type"


def _values(o: Any) -> list[Any]:
    from hydra.core.override_parser.types import ChoiceSweep

    if not o.is_sweep_override():
        return [o.value()]
    v = o.value()
    return list(v.list) if isinstance(v, ChoiceSweep) else []


def check(args: list[str], conf_dir: str | Path) -> None:
    """Raise AlignError for the first override naming no key or group option, or of the wrong type."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    if not candidates:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # a syntax error: Hydra's own message says where
        return
    schema = OmegaConf.structured(AlignConfig)
    all_keys = _leaves(schema)
    groups = {
        d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(conf_dir).iterdir() if d.is_dir()
    }
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_add() or o.is_delete() or o.is_force_add() or o.package:
            continue
        if key in groups:  # a config group choice: model=..., adapter=..., stage=...
            for v in _values(o):
                if isinstance(v, str) and v not in groups[key]:
                    close = difflib.get_close_matches(v, groups[key], n=1, cutoff=0.6)
                    guess = f"did you mean {key}={close[0]}? " if close else ""
                    raise AlignError(
                        f"{key}={v}: no such option; {guess}choose one of: {', '.join(groups[key])}"
                    )
            continue
        node: Any = schema
        parts = key.split(".")
        for i, part in enumerate(parts):
            has = isinstance(node, DictConfig) and part in list(node.keys())
            child = node._get_node(part) if has else None
            if child is None:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                level = list(node.keys()) if isinstance(node, DictConfig) else []
                guess = _suggest(key, level, prefix, all_keys)
                hint = f"; did you mean {guess}?" if guess else ""
                raise AlignError(f"unknown key '{key}'{hint} {HINT}")
            node = child
        for v in _values(o):
            probe = OmegaConf.structured(AlignConfig)
            try:
                OmegaConf.update(probe, key, v, merge=True)
            except Exception:
                raise AlignError(
                    f"{key}={o.input_line.split('=', 1)[1]}: {key} takes {_type_hint(node)}"
                ) from None
