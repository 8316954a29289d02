"""Rollouts: prompts in, sampled completions out, plus what PPO needs from forward passes
over them (per-token log-probs, hidden states) and the sequence scores (a reward head on
the shared backbone, or a programmatic judge)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError

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


def render_prompt(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(tokenizer, prompts: list[Any], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (chat template applied to message lists)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): 1 for every token up to and including the first stop token."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    has_eos = is_stop.any(1)
    # tokens strictly after the first stop token have a stop token before them
    after = (is_stop.cumsum(1) - is_stop.long()) > 0
    return (~after).float(), has_eos


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Any], p: Any, device: str, stop_ids: list[int]) -> Rollout:
    """Sample one completion per prompt with the model's active adapter (KV cache on)."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=p.temperature,
        top_k=p.top_k or None,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    completion_ids = out[:, prompt_ids.size(1) :]
    mask, has_eos = completion_mask(completion_ids, stop_ids)
    completion_ids = torch.where(
        mask.bool(), completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id)
    )
    texts = [
        tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
        for ids, m in zip(completion_ids.tolist(), mask, strict=True)
    ]
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, has_eos, list(prompts), texts)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # left padding: positions count real tokens only (what generate() used)
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


# tokens whose logits exist at once when log-probs are taken: 64 x a 49k vocabulary = 12.6 MB
LOGPROB_CHUNK = 64
# config fields of models whose logits are more than lm_head(hidden) (softcapping, scaling)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    width: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, width) of the last ``width`` tokens under the model's active adapter, from
    logits divided by the sampling temperature.

    Only those positions go through the LM head, LOGPROB_CHUNK tokens at a time, so full-vocab
    logits never exist for the whole batch; with autograd on, each chunk is recomputed in
    backward instead of keeping its log-softmax (B x width x vocab floats) alive until then.
    The entropy is a statistic, not part of any loss: computed outside the autograd graph."""
    if any(getattr(model.config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return _logprobs_from_model_logits(model, input_ids, attention_mask, width, temperature, with_entropy)
    hidden = hidden_states(model, input_ids, attention_mask)[:, -width - 1 : -1]
    targets = input_ids[:, -width:]
    head = model.get_output_embeddings()
    B = hidden.size(0)
    flat_h, flat_t = hidden.reshape(B * width, -1), targets.reshape(B * width)
    parts, ents = [], []
    for h, t in zip(flat_h.split(LOGPROB_CHUNK), flat_t.split(LOGPROB_CHUNK), strict=True):
        if torch.is_grad_enabled() and h.requires_grad:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, temperature, with_entropy)
        parts.append(lp)
        ents.append(ent)
    logprobs = torch.cat(parts).view(B, width)
    entropy = torch.cat(ents).view(B, width) if with_entropy else None
    return logprobs, entropy


def _chunk_logprobs(head, h, targets, temperature: float, with_entropy: bool):
    return _logprobs_of(head(h), targets, temperature, with_entropy)


def _logprobs_of(logits, targets, temperature: float, with_entropy: bool):
    """Log-probs of ``targets`` under softmax(logits / temperature), and its entropy (no grad)."""
    from align.rl.losses import entropy_from_logits

    logits = logits.float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def _logprobs_from_model_logits(model, input_ids, attention_mask, width, temperature, with_entropy):
    """The model's own logits (its softcapping / scaling applied), all positions at once."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        logits_to_keep=width + 1,
        use_cache=False,
    )
    return _logprobs_of(out.logits[:, :-1], input_ids[:, -width:], temperature, with_entropy)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, H) of the decoder under the model's active adapter."""
    from align.backbone import decoder

    out = decoder(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def completion_values(head, hidden: torch.Tensor, width: int) -> torch.Tensor:
    """V(s_t) for each completion token t: the head on the hidden state that predicts token t."""
    return head(hidden[:, -width - 1 : -1].to(head.weight.dtype)).squeeze(-1)


def last_token_scores(head, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A scalar head on the last real token of each (right-padded) sequence."""
    last = attention_mask.size(1) - 1 - attention_mask.flip(1).long().argmax(1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return head(hidden[rows, last].to(head.weight.dtype)).squeeze(-1)
