"""PPO: prompts -> policy adapter, against a reward model (an rm run) or a programmatic judge.

One base model in memory; the policy, reference, value and reward are named adapters on it
(see align/rl/ppo.py). The policy starts from ``ppo.policy`` (an sft/dpo/ppo run; also the
frozen reference) or, without it, from a fresh adapter with the adapter-disabled base as
reference.
"""

from __future__ import annotations

from align import artifacts, backbone, guard, training
from align.config import LORA_KINDS, PREFERENCE_STAGES
from align.training import StageContext

_PPO_INSTEAD = (
    "PPO shares one base between LoRA adapters (policy, reference, value, reward): train that run with "
    "adapter=lora (or qlora/dora), or, for a freeze or full run, export it (stage=export) and use its model "
    "as model.name_or_path"
)
HEADLINE = ["eval/score", "eval/ref_score", "train/first_scores", "objective/scores", "objective/kl"]


def run(ctx: StageContext) -> dict[str, float]:
    import torch

    from align.rl import ppo, rollout

    cfg = ctx.cfg
    p = cfg.ppo
    _init_distributed(cfg)
    policy = reward = None
    if p.policy:
        policy = artifacts.read(
            p.policy,
            key="ppo.policy",
            expect_stage=("sft", *PREFERENCE_STAGES, "ppo"),
            base_model=cfg.model.name_or_path,
        )
        policy.require_kind("ppo.policy", LORA_KINDS, _PPO_INSTEAD)
    reward_fn = None
    if p.reward.startswith(("judge:", "fn:")):
        reward_fn = rollout.reward_function(p.reward)
    else:
        reward = artifacts.read(
            p.reward, key="ppo.reward", expect_stage=("rm",), base_model=cfg.model.name_or_path
        )
        reward.require_kind("ppo.reward", LORA_KINDS, _PPO_INSTEAD)
    dist = ppo.Dist.current()
    rollout_prompts = cfg.train.batch_size * cfg.train.grad_accum * p.num_mini_batches
    needed = cfg.train.max_steps * rollout_prompts * dist.world
    split = training.load_data(cfg, "prompt", needed, as_dataset=False)  # rows are only iterated

    rt = backbone.detect_runtime(cfg)
    path = backbone.resolve_model_path(cfg.model)
    tokenizer = backbone.load_tokenizer(path, cfg.model)
    torch.manual_seed(cfg.seed)  # fresh adapters and value head: the same on every rank and every run
    models = ppo.build_models(
        cfg,
        path,
        rt,
        policy_dir=policy.adapter_dir if policy else None,
        reward_dir=reward.adapter_dir if reward else None,
    )
    device = rt.device if rt.device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(cfg.seed + dist.rank)
    trainer = ppo.PPOTrainer(
        cfg, models, tokenizer, device, reward_fn=reward_fn, dist=dist, autocast_dtype=rt.autocast_dtype
    )
    rows = _fitting_prompts(split.train, tokenizer, cfg)
    ckpt = guard.PPOCheckpoint(ctx)  # train.save_steps checkpoints, SIGTERM/SIGINT save+stop, resume
    with ckpt.guard.signals():
        history = trainer.train(rows, tracker=ctx.tracker, seed=cfg.seed, checkpoint=ckpt)
    dist.check_in_sync(models.trainable)
    if dist.rank == 0:  # every step's metrics (the reward curve); metrics.json keeps the last values
        artifacts.write_json_atomic(ctx.run_dir / "log_history.json", history)
    ckpt.raise_if_stopped()

    metrics = {k: v for k, v in history[-1].items()}
    metrics["train/first_scores"] = history[0]["objective/scores"]
    metrics["train/first_kl"] = history[0]["objective/kl"]
    metrics["train/global_step"] = float(len(history))
    if split.eval is not None:
        held_out = _fitting_prompts(split.eval, tokenizer, cfg)
        for role, prefix in (("policy", "eval/"), ("ref", "eval/ref_")):
            for k, v in trainer.evaluate(held_out, role=role, seed=cfg.seed).items():
                metrics[prefix + k] = v
    lineage = {
        "policy_init": str(policy.run_dir) if policy else None,
        "reward": str(reward.run_dir) if reward else p.reward,
        "reference": "policy_init adapter" if policy else "base model (adapters disabled)",
    }
    return training.finish(
        ctx,
        model=models.policy,
        tokenizer=tokenizer,
        metrics=metrics,
        data_info=split.info,
        headline=HEADLINE,
        lineage=lineage,
    )


def _init_distributed(cfg) -> None:
    """Under `accelerate launch` / torchrun: join the process group (one rank per device)."""
    if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=cfg.device == "cpu")


def _fitting_prompts(dataset, tokenizer, cfg) -> list[dict]:
    """Rows whose rendered prompt leaves room for ppo.max_new_tokens within model.max_length."""
    from align.errors import AlignError
    from align.sampling import encode_prompts

    budget = cfg.model.max_length - cfg.ppo.max_new_tokens
    rows = [dict(r) for r in dataset]
    encoded = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    keep = [r for r, ids in zip(rows, encoded, strict=True) if len(ids) <= budget]
    if not keep:
        raise AlignError(
            f"no prompt fits in model.max_length={cfg.model.max_length} - ppo.max_new_tokens={cfg.ppo.max_new_tokens}"
            " tokens; raise model.max_length"
        )
    return keep
