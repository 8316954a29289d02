"""eval: an alignment report of any stage's output on held-out data (align/evaluation.py).

Generates on the held-out test prompts, judges them strictly, measures preference accuracy
on held-out pairs, KL to the base and completion length, side by side with the base model;
writes eval.json and report.md. Nothing is trained, so no adapter is saved.

A stage=classify run (``eval.model=outputs/classify/<time>``) is scored instead on a file of
labelled rows (``data.eval``) with its saved label mapping and threshold (align/classify.py).
"""

from __future__ import annotations

from align import evaluation, training
from align.training import StageContext

HEADLINE = [f"eval/{k}" for k in evaluation.HEADLINE]
CLASSIFY_HEADLINE = ["eval/roc_auc", "eval/pr_auc", "eval/f1", "eval/f1_saved_threshold", "eval/threshold"]


def run(ctx: StageContext) -> dict[str, float]:
    from align import classify

    cfg = ctx.cfg
    if classify.is_classifier_run(cfg.eval.model):
        report = classify.evaluate_run(cfg, ctx.run_dir, ctx.tracker)
        headline = CLASSIFY_HEADLINE + ["eval/macro_f1", "eval/accuracy"]
    else:
        report = evaluation.run(cfg, ctx.run_dir, ctx.tracker)
        headline = HEADLINE
    return training.finish(
        ctx,
        model=None,
        tokenizer=None,
        metrics=report["flat"],
        data_info=report["data"],
        headline=headline,
        lineage={"evaluated": report["model"]},
    )
