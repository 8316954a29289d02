"""SFT: supervised instruction tuning with TRL's SFTTrainer (loss on the responses only)."""

from __future__ import annotations

import time

from align import backbone, guard, training
from align.training import StageContext

HEADLINE = ["eval/loss", "eval/mean_token_accuracy", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.cfg
    split = training.load_data(cfg, "sft", training.needed_train_rows(cfg))
    bb = backbone.build(cfg)
    args = SFTConfig(
        **training.trainer_args(ctx, bb.runtime, has_eval=split.eval is not None),
        max_length=cfg.model.max_length,
        packing=cfg.train.packing,
        completion_only_loss=cfg.train.completion_only_loss,
    )
    started = time.perf_counter()  # tokenization + reference pass + training
    trainer = SFTTrainer(
        model=bb.model,
        args=args,
        train_dataset=split.train,
        eval_dataset=split.eval,
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    guard.train(ctx, trainer)  # checkpoints, SIGTERM/SIGINT, non-finite steps, resume
    metrics = training.train_metrics(trainer, since=started) | training.evaluate(trainer)
    return training.finish(
        ctx,
        model=trainer.model,
        tokenizer=bb.tokenizer,
        metrics=metrics,
        data_info=split.info,
        headline=HEADLINE,
        next_hint=f"python -m align stage=dpo dpo.init={ctx.run_dir}",
    )
