"""GRPO: prompts -> policy adapter with TRL's GRPOTrainer, rewarded by judges, functions or
a reward model (align/rewards.py). Each prompt gets ``grpo.num_generations`` completions;
a completion's advantage is its reward against its group's mean (and std).

:func:`run_online` is the recipe GRPO and RLOO share (stage=rloo calls it with TRL's
RLOOTrainer): the two trainers take the same arguments, only the advantage differs.
"""

from __future__ import annotations

from typing import Any

from align import artifacts, backbone, guard, rewards, training
from align.config import LORA_KINDS, POLICY_STAGES
from align.training import StageContext

HEADLINE = [
    "train/reward",
    "train/first_reward",
    "train/kl",
    "train/completions/mean_length",
    "train/global_step",
]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import GRPOConfig

    from align.trainers import AlignGRPOTrainer

    g = ctx.cfg.grpo
    return run_online(
        ctx, AlignGRPOTrainer, GRPOConfig, {"loss_type": g.loss_type, "scale_rewards": g.scale_rewards}
    )


def run_online(
    ctx: StageContext, trainer_cls: Any, config_cls: Any, extra: dict[str, Any]
) -> dict[str, float]:
    cfg = ctx.cfg
    key = cfg.stage
    g = cfg[key]
    init = None
    if g.init:
        init = artifacts.read(
            g.init,
            key=f"{key}.init",
            expect_stage=POLICY_STAGES,
            base_model=cfg.model.name_or_path,
        )
        init.require_kind(
            f"{key}.init",
            LORA_KINDS,
            f"stage={key} continues LoRA/DoRA/QLoRA runs; train the start with adapter=lora, or export a "
            "freeze/full run (stage=export) and use its model as model.name_or_path",
        )
    t = cfg.train
    prompts_per_step = t.batch_size * t.grad_accum * training.world_size() // g.num_generations
    needed = prompts_per_step * t.max_steps * g.num_iterations if t.max_steps > 0 else None
    split = training.load_data(cfg, "prompt", needed)
    reward_funcs = rewards.resolve(g.reward, cfg, key=f"{key}.reward")
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    args = config_cls(
        **training.trainer_args(ctx, bb.runtime, has_eval=False),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        num_iterations=g.num_iterations,
        epsilon=g.epsilon,
        reward_weights=list(g.reward_weights) if g.reward_weights else None,
        use_vllm=g.use_vllm,
        vllm_mode=g.vllm_mode,
        log_completions=g.log_completions and bool(ctx.tracker.report_to),
        num_completions_to_print=2,
        **extra,
    )
    trainer = trainer_cls(
        model=bb.model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=split.train,
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    guard.train(ctx, trainer)  # checkpoints, SIGTERM/SIGINT, non-finite steps, resume
    metrics = training.train_metrics(trainer)
    first = next((e["reward"] for e in trainer.state.log_history if "reward" in e), None)
    if first is not None:
        metrics["train/first_reward"] = float(first)
    lineage = {
        "init": str(init.run_dir) if init else None,
        "reward": g.reward,
        "reference": ("init adapter" if init else "base model (adapters disabled)") if g.beta else None,
    }
    return training.finish(
        ctx,
        model=trainer.model,
        tokenizer=bb.tokenizer,
        metrics=metrics,
        data_info=split.info,
        headline=HEADLINE,
        lineage=lineage,
        next_hint=f"python -m align stage=eval eval.model={ctx.run_dir}",
    )
