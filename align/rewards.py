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
        self.autocast = rt.autocast_dtype  # bf16 autocast where the run's train.autocast turns it on
        self.batch_size = batch_size
        self.run_dir = art.run_dir
        self.__name__ = f"rm:{art.run_dir.name}"  # TRL names the reward column after it
        self._torch = torch

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        from align.sampling import autocast_context

        torch = self._torch
        texts = reward_texts(self.tokenizer, prompts, completions)
        scores: list[float] = []
        with torch.no_grad(), autocast_context(self.device, self.autocast):
            for i in range(0, len(texts), self.batch_size):
                ids, mask = encode_right_padded(self.tokenizer, texts[i : i + self.batch_size], self.device)
                # transformers' sequence-classification pooling: the last non-pad token
                scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


def reward_texts(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
    """Prompt + completion as TRL's RewardTrainer showed them to a reward model in training:
    the chat template over the messages (so the text ends the way the template ends an assistant
    turn, e.g. ``<|im_end|>\n``), or plain prompt + completion + EOS (TRL appends the EOS to
    plain-text responses). A completion cut at the token limit is scored as if it ended there;
    what the cut costs is ``ppo.missing_eos_penalty``'s business."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        if isinstance(p, str):
            text, eos = p + _completion_text(c), tokenizer.eos_token
            out.append(text if not eos or text.endswith(eos) else text + eos)
        else:
            msgs = list(p) + [{"role": "assistant", "content": _completion_text(c)}]
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


def encode_right_padded(tokenizer: Any, texts: Sequence[str], device: Any = "cpu"):
    """(input_ids, attention_mask) of ``texts`` (no special tokens added), right-padded with the
    tokenizer's pad id (backbone.load_tokenizer always sets one), whatever its ``padding_side``."""
    import torch

    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    width = max(map(len, ids))
    out = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        out[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return out.to(device), mask.to(device)


def score_index(input_ids: Any, pad_id: int) -> Any:
    """Per row, the position whose hidden state a reward model's score is read from: the last
    token that is not the pad token, which is where transformers' ``*ForSequenceClassification``
    pools and so where TRL's RewardTrainer trained the score (for SmolLM2's template, whose pad
    token is ``<|im_end|>``, that is the ``\n`` after it, not the ``<|im_end|>``)."""
    import torch

    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return (positions * (input_ids != pad_id).int()).argmax(-1)


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
