"""Rewards for online RL and evaluation, all with TRL's reward-function signature
``fn(prompts, completions, completion_ids=None, **columns) -> list[float]``.

A reward spec is ``judge:<name>`` (e.g. ``judge:ifeval``: the strict judges' instruction-level
score), ``fn:<module>:<function>`` (any importable function), or the run directory of a
stage=rm run (its LoRA + score head on a sequence-classification copy of the base), and
several specs join with ``+`` (``judge:ifeval+outputs/rm/<ts>``) to be weighted.

``judge:`` and ``fn:`` specs resolve through :func:`align.rl.rollout.reward_function`, the
resolver PPO uses, so a judge registered there works for PPO, GRPO, RLOO and eval alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align import artifacts
from align.errors import AlignError

log = logging.getLogger(__name__)


def split_specs(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split("+") if s.strip()]


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion[-1]["content"]) if completion else ""


class RewardModel:
    """A stage=rm run as a reward function: the base as a sequence classifier + the run's
    LoRA and score head, scoring the chat-formatted prompt + completion (last token)."""

    def __init__(self, run_dir: str | Path, cfg: Any, *, key: str = "reward", batch_size: int = 8):
        import torch

        from align import backbone

        art = artifacts.read(run_dir, key=key, expect_stage=("rm",), base_model=cfg.model.name_or_path)
        rt = backbone.detect_runtime(cfg)
        path = backbone.resolve_model_path(cfg.model)
        self.tokenizer = backbone.load_tokenizer(str(art.adapter_dir), cfg.model)
        base = backbone.load_base_model(path, cfg, rt, task="seq_cls")
        base.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = backbone.load_adapter(base, art.adapter_dir, trainable=False).eval()
        self.device = rt.device
        self.batch_size = batch_size
        self.run_dir = art.run_dir
        self.__name__ = f"rm:{art.run_dir.name}"  # TRL names the reward column after it
        self._torch = torch

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        out = []
        for p, c in zip(prompts, completions, strict=True):
            if isinstance(p, str):
                out.append(p + _completion_text(c))
            else:
                msgs = list(p) + [{"role": "assistant", "content": _completion_text(c)}]
                out.append(self.tokenizer.apply_chat_template(msgs, tokenize=False))
        return out

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        torch = self._torch
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # the score is read at the last real token
        try:
            with torch.no_grad():
                for i in range(0, len(texts), self.batch_size):
                    enc = self.tokenizer(
                        texts[i : i + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=False,
                    ).to(self.device)
                    scores += self.model(**enc).logits[:, 0].float().tolist()
        finally:
            self.tokenizer.padding_side = side
        return scores


def resolve(spec: str, cfg: Any, *, key: str) -> list[Callable[..., Sequence[float]]]:
    """The reward functions named by ``spec`` (``+``-joined), in order."""
    from align.rl.rollout import reward_function

    funcs: list[Callable[..., Sequence[float]]] = []
    for s in split_specs(spec):
        if s.startswith(("judge:", "fn:")):
            try:
                funcs.append(reward_function(s))
            except AlignError as e:  # its messages name ppo.reward; say which key it was
                raise AlignError(str(e).replace("ppo.reward=", f"{key}=")) from None
        elif Path(s).expanduser().is_dir():
            funcs.append(RewardModel(s, cfg, key=key))
        else:
            raise AlignError(
                f"{key}={spec}: {s!r} is not judge:<name>, fn:<module>:<function> or an rm run directory"
            )
    if not funcs:
        raise AlignError(f"{key} is empty; give judge:ifeval, fn:<module>:<function> or an rm run directory")
    return funcs
