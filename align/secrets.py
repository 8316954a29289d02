"""Keep credentials out of everything align writes: config.yaml, artifact.json, run.json,
error.txt, model cards, the W&B config/tags, and Hydra's own records of the command line.

A value is redacted when its key names a secret (``*key*``, ``*token*``, ``*secret*``,
``*password*``), when it looks like a credential (``hf_...``, ``sk-...``, ``ghp_...``,
``wandb_v1_...``, ``AKIA...``, a 40-hex W&B key), or when it contains the value of a
secret environment variable (WANDB_API_KEY, HF_TOKEN, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MASK = "***"
SECRET_KEY_PARTS = ("key", "token", "secret", "password", "passwd", "credential")
# config keys that contain a marker but hold no secret
NOT_SECRET_KEYS = {"tokenizer", "max_new_tokens", "chat_template", "hub_id", "tokens"}
PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{16,}"),
    re.compile(r"sk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"wandb_v1_[A-Za-z0-9_]{16,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{40}(?![0-9a-fA-F])"),  # W&B API key; also a git sha
]
GIT_SHA_KEYS = {"git_revision"}


def _secret_env_values() -> list[str]:
    """Values of environment variables named like credentials (WANDB_API_KEY, HF_TOKEN, ...)."""
    marks = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"}
    out = {v for k, v in os.environ.items() if len(v) >= 8 and marks & set(k.upper().split("_"))}
    return sorted(out, key=len, reverse=True)


def secret_key(key: str) -> bool:
    k = key.lower().rsplit(".", 1)[-1]
    if k in NOT_SECRET_KEYS or k.endswith(("_tokens", "_token_id", "_token_ids")):
        return False
    return any(p in k for p in SECRET_KEY_PARTS)


def redact_text(text: str, *, keep_git_sha: bool = False) -> str:
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    for pat in PATTERNS:
        if keep_git_sha and pat.pattern.startswith("(?<![0-9a-fA-F])"):
            continue
        text = pat.sub(MASK, text)
    return text


def redact(obj: Any, key: str = "") -> Any:
    """A copy of plain data (dicts, lists, strings) with secrets masked."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v, key) for v in obj)
    if isinstance(obj, str):
        if key and secret_key(key) and obj:
            return MASK
        return redact_text(obj, keep_git_sha=key in GIT_SHA_KEYS)
    return obj


def scrub_files(root: str | Path, names: tuple[str, ...] = ("*.yaml", "*.log", "*.txt", "*.json")) -> None:
    """Redact secrets in place in the text files under ``root`` (e.g. Hydra's .hydra/overrides.yaml)."""
    for pattern in names:
        for p in Path(root).rglob(pattern):
            if not p.is_file() or p.stat().st_size > 5_000_000:
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            clean = redact_text(text, keep_git_sha=True)
            if clean != text:
                p.write_text(clean, encoding="utf-8")
