"""RLOO: prompts -> policy adapter with TRL's RLOOTrainer (REINFORCE; each completion's
baseline is the mean reward of the other completions of its prompt), with the rewards and
the recipe of stage=grpo (align/rewards.py, align/stages/grpo.py:run_online)."""

from __future__ import annotations

from align.stages.grpo import run_online
from align.training import StageContext


def run(ctx: StageContext) -> dict[str, float]:
    from trl import RLOOConfig

    from align.trainers import AlignRLOOTrainer

    return run_online(
        ctx, AlignRLOOTrainer, RLOOConfig, {"normalize_advantages": ctx.cfg.rloo.normalize_advantages}
    )
