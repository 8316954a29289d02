"""Where align keeps what it can reuse across runs: converted models, tokenized datasets
and the reference log-probabilities computed on them. ``$ALIGN_CACHE``, else ~/.cache/align."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")
