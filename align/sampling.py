"""THE one sampling path: completions for eval, PPO rollouts and anything else that generates,
and the log-probs of completions under a model.

What makes it fast on small hardware, where a decode step is dominated by per-step overhead
rather than arithmetic:

* the active LoRA adapter is merged into the base weights for the duration of sampling (one
  matmul per linear layer instead of three plus an add), on a copy of the base weight, so
  the original weights are put back bit-identical afterwards (:func:`merged_adapter`);
* prompts are sorted by length (little left padding) and batched as large as memory allows
  (:func:`auto_batch_size`);
* rows that finished (stop token or budget) leave the batch and the KV cache at once, so a
  batch costs what its live rows cost, not what its longest row costs;
* greedy decoding returns the log-prob of every chosen token from the decode step itself,
  so the KL to a reference needs one forward pass (the reference's), not two.

The forward passes over finished completions (:func:`token_logprobs`) run only the positions
that are scored through the LM head, ``LOGPROB_CHUNK`` tokens at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# never more rows in one decode batch than this, whatever the memory allows
MAX_BATCH = 64
# share of the available memory the KV cache and activations of one batch may take
MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated ids, up to and including the stop token
    n_tokens: int = 0  # generated tokens before the stop token
    truncated: bool = False  # hit max_new_tokens without a stop token
    logprobs: list[float] | None = None  # greedy: log p(token) at T=1 for every id in ``ids``


# --------------------------------------------------------------------------- adapters


def _lora_layers(model) -> list[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _mergeable(layer) -> list[str]:
    """The active plain-LoRA adapters of ``layer`` that can be merged into an unquantized
    nn.Linear (not DoRA or other variants, not a LoRA bias, not a 4/8-bit base)."""
    if layer.disable_adapters or layer.merged or type(layer.get_base_layer()) is not nn.Linear:
        return []
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in layer.lora_variant or layer.lora_bias.get(a, False) for a in active):
        return []
    return active


def merge_cost_bytes(model) -> int:
    """Bytes :func:`merged_adapter` allocates: one copy of every base weight it merges into."""
    total = 0
    for layer in _lora_layers(model):
        if _mergeable(layer):
            w = layer.get_base_layer().weight
            total += w.numel() * w.element_size()
    return total


@contextlib.contextmanager
def merged_adapter(model, *, enabled: bool = True) -> Iterator[bool]:
    """Within the block, the model's active LoRA adapter is folded into its base weights
    (W + B A s, as peft's safe merge computes it), and peft's forward skips the LoRA branch.
    The merged weight is a new tensor; the original is put back on exit, so the base is
    bit-identical afterwards, and gradients never see the merged copy. Yields whether
    anything was merged: nothing is for a 4-bit/8-bit base, DoRA, disabled adapters, or when
    the copy would not fit in memory (then the unmerged forward runs, as before)."""
    layers = [(layer, _mergeable(layer)) for layer in _lora_layers(model)] if enabled else []
    layers = [(layer, names) for layer, names in layers if names]
    if layers:
        need = merge_cost_bytes(model)
        device = layers[0][0].get_base_layer().weight.device
        if need > MEMORY_SHARE * 2 * available_memory(device):
            log.info("not merging the adapter for sampling: %.0f MB would not fit", need / 2**20)
            layers = []
    saved: list[tuple[Any, torch.Tensor, list[str]]] = []
    try:
        with torch.no_grad():
            for layer, names in layers:
                weight = layer.get_base_layer().weight
                merged = weight.data.clone()
                for name in names:
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                saved.append((layer, weight.data, names))
                weight.data = merged
                layer.merged_adapters.extend(names)
        yield bool(saved)
    finally:
        for layer, original, names in saved:
            layer.get_base_layer().weight.data = original
            for name in names:
                layer.merged_adapters.remove(name)


# --------------------------------------------------------------------------- batch size


def available_memory(device: torch.device | str) -> int:
    """Bytes free for new tensors on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def bytes_per_row(model, tokens: int) -> int:
    """Memory one sequence of ``tokens`` tokens needs while it is decoded: its KV cache, the
    prefill's activations (the MLP's intermediate dominates) and a row of fp32 logits."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    size = next(model.parameters()).element_size()
    size = max(size, 2)  # 4-bit weights still compute in 16/32 bit
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * tokens * size
    prefill = tokens * (4 * c.hidden_size + 3 * inter) * size + heads * tokens * tokens * 4
    return kv + prefill + c.vocab_size * 4


def auto_batch_size(model, tokens: int, *, cap: int = MAX_BATCH, device: torch.device | str = "cpu") -> int:
    """The largest batch whose decode state fits in MEMORY_SHARE of the available memory, at
    most ``cap`` rows."""
    budget = MEMORY_SHARE * available_memory(device)
    return int(max(1, min(cap, budget // bytes_per_row(model, tokens))))


# --------------------------------------------------------------------------- sampling


def stop_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def _warpers(p: SamplingParams):
    """transformers' own logits warpers, in generate()'s order (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    return warpers


def sample(
    model,
    prompt_ids: Sequence[list[int]],
    params: SamplingParams,
    *,
    stop: list[int],
    pad_id: int,
    batch_size: int = 0,
    device: str | torch.device = "cpu",
    merge: bool = True,
    desc: str = "generate",
    progress: bool = True,
) -> list[Completion]:
    """One completion per prompt (given as token ids) under the model's active adapter.

    Greedy when ``params.temperature == 0``: the tokens are exactly ``model.generate``'s,
    and each comes with its log-prob. Otherwise sampled with transformers' warpers and
    ``torch.multinomial``. ``batch_size=0`` sizes batches by memory (:func:`auto_batch_size`).
    """
    from tqdm.auto import tqdm

    n = len(prompt_ids)
    out: list[Completion | None] = [None] * n
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    longest = len(prompt_ids[order[-1]]) + params.max_new_tokens
    bs = batch_size or auto_batch_size(model, longest, device=device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc=desc, unit="prompt", leave=False, disable=not progress)
    try:
        with merged_adapter(model, enabled=merge), torch.no_grad():
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                done = _decode(model, [prompt_ids[i] for i in idx], params, stop, pad_id, device)
                for i, c in zip(idx, done, strict=True):
                    out[i] = c
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


def _decode(model, prompts: list[list[int]], p: SamplingParams, stop: list[int], pad_id: int, device):
    """Decode one batch (KV cache on); finished rows are dropped from the batch and the cache."""
    from transformers import DynamicCache

    B, width = len(prompts), max(len(x) for x in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for row, x in enumerate(prompts):
        ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    greedy = p.temperature <= 0
    warpers = None if greedy else _warpers(p)
    stop_t = torch.tensor(stop, device=device)
    done = [Completion(prompt_ids=list(x)) for x in prompts]
    live = torch.arange(B, device=device)  # batch row -> prompt index
    generated: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = positions[:, -1:] + 1
    for step in range(p.max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if greedy:
            token = logits.argmax(-1)
            lp = (logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)).tolist()
        else:
            probs = torch.softmax(warpers(ids, logits), dim=-1)  # these warpers ignore the ids
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
            lp = None
        finished = torch.isin(token, stop_t)
        if step == p.max_new_tokens - 1:
            finished = torch.ones_like(finished)
        tok_list = token.tolist()
        fin_list = finished.tolist()
        rows = live.tolist()
        for r, (row, t, f) in enumerate(zip(rows, tok_list, fin_list, strict=True)):
            generated[row].append(t)
            if lp is not None:
                logps[row].append(lp[r])
            if f:
                hit = t in stop
                c = done[row]
                c.ids = generated[row]
                c.n_tokens = len(c.ids) - (1 if hit else 0)
                c.truncated = not hit
                c.logprobs = logps[row] if greedy else None
        if all(fin_list):
            break
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel() < finished.numel():
            cache.batch_select_indices(keep)
            live, token, mask, next_pos, ids = live[keep], token[keep], mask[keep], next_pos[keep], ids[keep]
        mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return done


# --------------------------------------------------------------------------- log-probs


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count real tokens only (what generation used)."""
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
        position_ids=positions(attention_mask),
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
        position_ids=positions(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def completion_logprobs(
    model,
    seqs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "log-probs",
    progress: bool = True,
) -> list[list[float]]:
    """Per-token log-probs (T=1) of each completion given its prompt, both as token ids, under
    the model's active adapter. Sequences are sorted by length and batched (``batch_size=0``:
    sized by memory), prompts left-padded and completions right-padded, so only completion
    positions go through the LM head (chunked, :func:`token_logprobs`)."""
    from tqdm.auto import tqdm

    n = len(seqs)
    out: list[list[float] | None] = [None] * n
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (len(seqs[i][0]) + len(seqs[i][1]), len(seqs[i][1])))
    longest = max(len(p) + len(c) for p, c in seqs)
    bs = batch_size or auto_batch_size(model, longest, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, bs), desc=desc, unit="batch", leave=False, disable=not progress):
                idx = order[start : start + bs]
                P = max(len(seqs[i][0]) for i in idx)
                C = max(max(len(seqs[i][1]) for i in idx), 1)
                ids = torch.zeros((len(idx), P + C), dtype=torch.long)
                mask = torch.zeros((len(idx), P + C), dtype=torch.long)
                for row, i in enumerate(idx):
                    p, c = seqs[i]
                    ids[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
                    ids[row, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[row, P - len(p) : P + len(c)] = 1
                lp, _ = token_logprobs(model, ids.to(device), mask.to(device), C, 1.0)
                for row, i in enumerate(idx):
                    out[i] = lp[row, : len(seqs[i][1])].float().tolist()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
