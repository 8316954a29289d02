"""eval: an alignment report of any stage's output on held-out data (align/evaluation.py).

Generates on the held-out test prompts, judges them strictly, measures preference accuracy
on held-out pairs, KL to the base and completion length, side by side with the base model;
writes eval.json, report.md and eval.png (per-instruction-type accuracy next to the base).
``eval.model=[base,<run a>,<run b>]`` evaluates several models on the same prompts into one
side-by-side table (evaluation.run_many). Nothing is trained, so no adapter is saved.

A stage=classify run (``eval.model=outputs/classify/<time>``) is scored instead on a file of
labelled rows (``data.eval``) with its saved label mapping and threshold (align/classify.py).
"""

from __future__ import annotations

from typing import Any

from align import evaluation, training
from align.training import StageContext

HEADLINE = [f"eval/{k}" for k in evaluation.HEADLINE]
CLASSIFY_HEADLINE = ["eval/roc_auc", "eval/pr_auc", "eval/f1", "eval/f1_saved_threshold", "eval/threshold"]


def run(ctx: StageContext) -> dict[str, float]:
    from align import classify

    cfg = ctx.cfg
    specs = evaluation.model_specs(cfg.eval.model)
    if len(specs) == 1:  # eval.model=[x] is eval.model=x
        cfg.eval.model = specs[0]
    if len(specs) == 1 and classify.is_classifier_run(specs[0]):
        report = classify.evaluate_run(cfg, ctx.run_dir, ctx.tracker)
        headline = CLASSIFY_HEADLINE + ["eval/macro_f1", "eval/accuracy"]
    else:
        report = evaluation.run(cfg, ctx.run_dir, ctx.tracker)
        headline = HEADLINE
    if "models" in report:  # several models: one table, the headline is each one's accuracy
        headline = [f"eval/{m['label']}/ifeval/prompt_accuracy" for m in report["models"]]
        evaluated: Any = [m["model"] for m in report["models"]]
    else:
        evaluated = report["model"]
    return training.finish(
        ctx,
        model=None,
        tokenizer=None,
        metrics=report["flat"],
        data_info=report["data"],
        headline=headline,
        lineage={"evaluated": evaluated},
    )
