"""One module per stage; each exposes ``run(ctx) -> dict of metrics``, read top to bottom
like a recipe: build backbone -> load data -> train -> evaluate -> save artifact."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from align.config import validate


def execute(cfg: Any, run_dir: str | Path) -> dict[str, float]:
    """Validate ``cfg``, open the W&B run and run the stage into ``run_dir``."""
    from align import runs, tracking
    from align.console import fold_data_bars, quiet_libraries
    from align.training import StageContext

    quiet_libraries()  # again: a test runner or notebook may have reset the warnings filters
    validate(cfg)
    seed_everything(int(cfg.seed))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = runs.resume_state(cfg, run_dir)  # resume=<run dir>: its last checkpoint and W&B run
    tracker = tracking.start(cfg, cfg.stage, run_dir, resume_id=resume.wandb_id)
    runs.record_start(cfg, run_dir, tracker)  # config.yaml + run.json, what resume reads
    ctx = StageContext(cfg=cfg, run_dir=run_dir, tracker=tracker, resume_from=resume.checkpoint)
    try:
        # TRL's 3-8 data passes draw one bar (align/console.py); eval/export use no `datasets`
        with fold_data_bars(enabled=cfg.stage not in ("eval", "export")):
            metrics = importlib.import_module(f"align.stages.{cfg.stage}").run(ctx)
        if cfg.train.eval_at_end:
            metrics = _eval_at_end(ctx, metrics)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return metrics


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch before the stage builds anything.

    torch starts each process from a random seed, and the trainers seed only when they are
    constructed: weights made before that (a reward model's or classifier's fresh score head, a
    value head) were random per process, so ``stage=rm`` was not reproducible, ignored ``seed=``,
    and differed from the same stage run inside ``stage=rlhf`` (where the sft sub-run's seeded
    training left the generator in a fixed state)."""
    from transformers import set_seed

    set_seed(seed)


def _eval_at_end(ctx: Any, metrics: dict[str, float]) -> dict[str, float]:
    """train.eval_at_end: stage=eval's report on this run's own output, into its run dir."""
    import gc
    import logging

    from align import artifacts, evaluation
    from align.tracking import is_main_process

    if ctx.cfg.stage not in evaluation.POLICY_STAGES:
        logging.getLogger(__name__).info(
            "train.eval_at_end: stage=%s has no policy to evaluate", ctx.cfg.stage
        )
        return metrics
    if not is_main_process():  # under accelerate launch the main process evaluates, once
        return metrics
    gc.collect()
    report = evaluation.run(ctx.cfg, ctx.run_dir, ctx.tracker, model_spec=str(ctx.run_dir))
    artifacts.add_metrics(ctx.run_dir, report["flat"])
    print(f"  report   {ctx.run_dir / evaluation.REPORT_MD}", flush=True)
    return metrics | report["flat"]
