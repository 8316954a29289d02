"""classify: a causal LM as a classifier (LoRA/QLoRA/DoRA/full) with a head on the last real
token; cross-entropy or focal loss with class and row weights; optional example packing.
Held-out metrics (ROC AUC, PR AUC, F1 at 0.5 and at the F1-maximising threshold, confusion
matrix), predictions.jsonl, roc.png/pr.png; the label mapping and the threshold are saved
in classifier.json, which `stage=eval eval.model=<this run>` uses. See docs/classify.md."""

from __future__ import annotations

import time

from align import artifacts, backbone, classify, data, guard, training
from align.config import classify_packing
from align.training import StageContext

HEADLINE = [
    "eval/roc_auc",
    "eval/pr_auc",
    "eval/f1",
    "eval/f1_tuned",
    "eval/threshold",
    "eval/macro_f1",
    "eval/accuracy",
    "train/loss",
    "data/truncated_rows",
]


def run(ctx: StageContext) -> dict[str, float]:
    from transformers import TrainingArguments

    cfg, c = ctx.cfg, ctx.cfg.classify
    # every training row (shuffled): the label set and class frequencies are the file's, even
    # when train.max_steps uses only the first rows
    split = data.load(cfg.data, "classify", seed=cfg.seed)
    all_rows, eval_rows = list(split.train), list(split.eval) if split.eval is not None else []
    labels = classify.LabelMap.from_labels([r["label"] for r in all_rows], c.labels)
    all_ids = [labels.id(r["label"], r["where"]) for r in all_rows]
    class_weights = classify.class_weights_for(c.class_weights, all_ids, labels.num_labels)
    train_rows = all_rows[: training.needed_train_rows(cfg)]
    split.info["train_rows"] = len(train_rows)
    tokenizer = backbone.tokenizer_for(cfg)
    truncate, max_len, pooling = c.truncate.value, cfg.model.max_length, c.pooling.value
    packing = classify_packing(cfg)
    train = classify.encode(train_rows, tokenizer, labels, max_len, truncate)
    held = classify.encode(eval_rows, tokenizer, labels, max_len, truncate)  # unknown labels fail here

    bb = backbone.build(cfg, task="seq_cls", num_labels=labels.num_labels, keep_layers=c.layer)
    model = backbone.apply_adapter(bb.model, cfg, bb.peft_config, bb.runtime)
    pad_id = bb.tokenizer.pad_token_id if bb.tokenizer.pad_token_id is not None else bb.tokenizer.eos_token_id
    args = training.trainer_args(ctx, bb.runtime, has_eval=bool(held.labels))
    if packing:  # packing fills rows from a random mix of lengths; grouping by length would not help
        args["train_sampling_strategy"] = "random"
    started = time.perf_counter()
    trainer = classify.ClassifierTrainer(
        model=model,
        args=TrainingArguments(**args, remove_unused_columns=False, label_names=["labels"]),
        train_dataset=classify.to_dataset(train),
        eval_dataset=classify.to_dataset(held) if held.labels else None,
        data_collator=classify.Collator(pad_id, packing, max_len),
        gamma=c.focal_gamma if c.loss.value == "focal" else 0.0,
        class_weights=class_weights,
        pooling=pooling,
    )
    guard.train(ctx, trainer)  # checkpoints, SIGTERM/SIGINT, non-finite steps, resume
    metrics = training.train_metrics(trainer, since=started)
    metrics |= {"data/truncated_rows": float(train.truncated + held.truncated)}

    details: dict = {}
    if held.labels:
        probs = classify.predict(
            trainer.model,
            held.input_ids,
            pad_id=pad_id,
            batch_size=cfg.train.eval_batch_size,
            packing=packing,
            max_length=max_len,
            pooling=pooling,
            autocast=bb.runtime.autocast_dtype,
        )
        ev, details = classify.metrics(held.labels, probs, labels, c.threshold)
        metrics |= ev | {"eval/loss": classify.eval_loss(probs, held.labels)}
        if c.predictions and training.is_main_process():
            classify.write_predictions(
                ctx.run_dir / classify.PREDICTIONS_FILE,
                held.ids,
                held.labels,
                probs,
                labels,
                details["threshold"],
            )
            pngs = (
                classify.save_curves(ctx.run_dir, held.labels, probs[:, 1].tolist()) if labels.binary else []
            )
            classify.log_plots(ctx.tracker, held.labels, probs, labels, pngs)
    info = {
        "labels": labels.names,
        "num_labels": labels.num_labels,
        "threshold": details.get("threshold", c.threshold),
        "truncate": truncate,
        "max_length": max_len,
        "packing": packing,
        "pooling": pooling,
        "layer": c.layer,
        "loss": c.loss.value,
        "focal_gamma": float(c.focal_gamma),
        "class_weights": class_weights,
        "confusion_matrix": details.get("confusion_matrix"),
    }
    if training.is_main_process():
        artifacts.write_json_atomic(ctx.run_dir / classify.CLASSIFIER_FILE, info)
    data_info = split.info | {"truncated_rows": train.truncated + held.truncated}
    return training.finish(
        ctx,
        model=trainer.model,
        tokenizer=bb.tokenizer,
        metrics=metrics,
        data_info=data_info,
        headline=HEADLINE,
        lineage={"classifier": info},
        next_hint=f"python -m align stage=eval eval.model={ctx.run_dir} data.eval=<held-out file>",
    )
