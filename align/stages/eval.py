"""eval: an alignment report of any stage's output on held-out data (align/evaluation.py).

Generates on the held-out test prompts, judges them strictly, measures preference accuracy
on held-out pairs, KL to the base and completion length, side by side with the base model;
writes eval.json and report.md. Nothing is trained, so no adapter is saved.
"""

from __future__ import annotations

from align import evaluation, training
from align.training import StageContext

HEADLINE = [f"eval/{k}" for k in evaluation.HEADLINE]


def run(ctx: StageContext) -> dict[str, float]:
    cfg = ctx.cfg
    report = evaluation.run(cfg, ctx.run_dir, ctx.tracker)
    return training.finish(
        ctx,
        model=None,
        tokenizer=None,
        metrics=report["flat"],
        data_info=report["data"],
        headline=HEADLINE,
        lineage={"evaluated": report["model"]},
    )
