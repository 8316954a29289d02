"""Rollouts: prompts in, sampled completions out, plus what PPO needs from forward passes
over them (per-token log-probs, hidden states) and the sequence scores (a reward head on
the shared backbone, or a programmatic judge)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from align import sampling
from align.errors import AlignError
from align.sampling import (  # noqa: F401 - PPO uses them as rollout.*
    _logprobs_from_model_logits,
    hidden_states,
    token_logprobs,
)

# judge:<name> for ppo.reward. A judge has the GRPO reward-function signature:
# fn(prompts, completions, completion_ids, **columns) -> list[float]
JUDGES: dict[str, str] = {"ifeval": "align.judges:ifeval_reward"}


def reward_function(spec: str) -> Callable[..., Sequence[float]]:
    """``judge:<name>`` (see :data:`JUDGES`) or ``fn:<module>:<function>`` -> the callable."""
    if spec.startswith("judge:"):
        name = spec.removeprefix("judge:")
        if name not in JUDGES:
            raise AlignError(
                f"ppo.reward={spec}: unknown judge; available: {', '.join(f'judge:{j}' for j in JUDGES)}"
            )
        target = JUDGES[name]
    elif spec.startswith("fn:"):
        target = spec.removeprefix("fn:")
    else:
        raise AlignError(
            f"ppo.reward={spec}: not a judge (judge:<name>) or a function (fn:<module>:<function>)"
        )
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise AlignError(f"ppo.reward={spec}: cannot import {target} ({e})") from None
    if not callable(fn):
        raise AlignError(f"ppo.reward={spec}: {target} is not callable")
    return fn


@dataclass
class Rollout:
    """A batch of prompts (left-padded to width P) and their completions (right-padded to C)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C)
    mask: torch.Tensor  # (B, C) float: 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool
    prompts: list[Any]  # as given (text or messages), for judges and tables
    completions: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)  # other dataset columns (constraints, ...)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors of rows ``idx``, trimmed to the longest completion among them."""
        width = max(int(self.mask[idx].sum(1).max().item()), 1)
        return {
            "input_ids": torch.cat([self.prompt_ids[idx], self.completion_ids[idx, :width]], 1),
            "attention_mask": torch.cat(
                [self.prompt_mask[idx], self.mask[idx, :width].to(self.prompt_mask.dtype)], 1
            ),
            "width": width,
        }


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[Any],
    p: Any,
    device: str,
    stop_ids: list[int],
    batch_size: int = 0,
    autocast: torch.dtype | None = None,
) -> Rollout:
    """Sample one completion per prompt with the model's active adapter, through align.sampling
    (adapter merged while sampling, finished rows leave the batch). ``batch_size=0``: all
    prompts in one batch where memory allows."""
    pad = tokenizer.pad_token_id
    encoded = sampling.encode_prompts(tokenizer, prompts)
    done = sampling.sample(
        model,
        encoded,
        sampling.SamplingParams(
            max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k
        ),
        stop=stop_ids,
        pad_id=pad,
        batch_size=batch_size or min(len(encoded), sampling.MAX_BATCH),
        device=device,
        autocast=autocast,
        progress=False,
    )
    prompt_ids, prompt_mask = sampling.left_pad(encoded, pad, device)
    C = max(len(c.ids) for c in done)
    completion_ids = torch.full((len(done), C), pad, dtype=torch.long)
    mask = torch.zeros((len(done), C))
    for row, c in enumerate(done):
        completion_ids[row, : len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
        mask[row, : len(c.ids)] = 1.0
    has_eos = torch.tensor([not c.truncated for c in done])
    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in done]
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids.to(device),
        mask.to(device),
        has_eos.to(device),
        list(prompts),
        texts,
    )


def completion_values(head, hidden: torch.Tensor, width: int) -> torch.Tensor:
    """V(s_t) for each completion token t: the head on the hidden state that predicts token t."""
    return head(hidden[:, -width - 1 : -1].to(head.weight.dtype)).squeeze(-1)


def last_token_scores(head, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A scalar head on the last real token of each (right-padded) sequence."""
    last = attention_mask.size(1) - 1 - attention_mask.flip(1).long().argmax(1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return head(hidden[rows, last].to(head.weight.dtype)).squeeze(-1)
