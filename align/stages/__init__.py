"""One module per stage; each exposes ``run(ctx) -> dict of metrics``, read top to bottom
like a recipe: build backbone -> load data -> train -> evaluate -> save artifact."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from align.config import validate


def execute(cfg: Any, run_dir: str | Path) -> dict[str, float]:
    """Validate ``cfg``, open the W&B run and run the stage into ``run_dir``."""
    from align import tracking
    from align.training import StageContext

    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracking.start(cfg, cfg.stage, run_dir)
    ctx = StageContext(cfg=cfg, run_dir=run_dir, tracker=tracker)
    try:
        metrics = importlib.import_module(f"align.stages.{cfg.stage}").run(ctx)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return metrics
