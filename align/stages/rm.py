"""RM: preference pairs -> reward model (LoRA task SEQ_CLS + scalar score head) with TRL's
RewardTrainer. The adapter directory holds the LoRA weights and the trained ``score``
head (peft keeps it in ``modules_to_save``), which is what PPO loads as its reward.

With ``rm.init=<sft run dir>`` the LoRA starts from that run's weights (the score head from
scratch), as InstructGPT starts its reward model from the SFT model; stage=rlhf does this."""

from __future__ import annotations

from align import backbone, guard, training
from align.training import StageContext

HEADLINE = ["eval/accuracy", "eval/margin", "eval/loss", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import RewardConfig

    from align.trainers import AlignRewardTrainer

    cfg = ctx.cfg
    init = training.init_run(cfg, "rm.init", expect=("sft",))
    split = training.load_data(cfg, "preference", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, task="seq_cls")
    if cfg.rm.head_init_std is not None:
        backbone.init_score_head(bb.model, cfg.rm.head_init_std)
    if init is not None:
        bb = backbone.start_from_weights(bb, init.adapter_dir)
    args = RewardConfig(
        **training.trainer_args(ctx, bb.runtime, has_eval=split.eval is not None),
        max_length=cfg.model.max_length,
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
    )
    trainer = AlignRewardTrainer(
        model=bb.model,
        args=args,
        train_dataset=split.train,
        eval_dataset=split.eval,
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    guard.train(ctx, trainer)  # checkpoints, SIGTERM/SIGINT, non-finite steps, resume
    metrics = training.train_metrics(trainer) | training.evaluate(trainer)
    return training.finish(
        ctx,
        model=trainer.model,
        tokenizer=bb.tokenizer,
        metrics=metrics,
        data_info=split.info,
        headline=HEADLINE,
        lineage={"init": str(init.run_dir) if init else None},
        next_hint=f"python -m align stage=ppo ppo.reward={ctx.run_dir} ppo.policy=<sft run dir>",
    )
