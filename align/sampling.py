"""THE one sampling path: completions for eval, PPO rollouts and anything else that generates,
and the log-probs of completions under a model.

What makes it fast on small hardware, where a decode step is dominated by per-step overhead
rather than arithmetic:

* the active LoRA adapter is merged into the base weights for the duration of sampling (one
  matmul per linear layer instead of three plus an add), in place, keeping what puts the
  original weights back bit-identical afterwards (:func:`merged_adapter`);
* prompts are sorted by length (little left padding) and batched as large as memory allows
  (:func:`auto_batch_size`);
* rows that finished (stop token or budget) leave the batch and the KV cache at once, so a
  batch costs what its live rows cost, not what its longest row costs;
* greedy decoding returns the log-prob of every chosen token from the decode step itself,
  so the KL to a reference needs one forward pass (the reference's), not two;
* under bf16 autocast the LM head computes from a bf16 copy of its weight made once
  (:func:`head_in_dtype`), not from a cast of the fp32 weight on every step;
* on CPU in fp32, a decode step's skinny matmuls run as ``W @ x.T`` (:func:`skinny_linears`),
  and rows that finish, leading columns nobody needs and newly joined prompts never copy the
  whole KV cache (:func:`_growing_layer_class`).

The forward passes over finished completions (:func:`token_logprobs`) run only the positions
that are scored through the LM head, ``LOGPROB_CHUNK`` tokens at a time.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from align import malloc

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


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # a float's bit pattern, by its width in bytes


def _delta(layer, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """The active adapters' B A s for this layer, as peft computes it, in the weight's dtype."""
    delta = layer.get_delta_weight(names[0])
    for name in names[1:]:
        delta = delta + layer.get_delta_weight(name)
    return delta.to(dtype)


@dataclass
class _Undo:
    """What puts a weight that was merged in place back to its exact original bits. ``merged -
    delta`` is the original to the bit almost everywhere (0.3% of SmolLM2-135M's weights differ,
    by an ulp or so, under a LoRA of a trained adapter's size): those few elements are kept
    whole (``where``, ``bits``). Where many differ (a delta large against its weights), the
    difference of the bit patterns is kept as an int8 per element (``residual``), and whole only
    where it does not fit (weights much smaller than their delta, a sign change)."""

    residual: torch.Tensor | None  # int8, the weight's shape; None: only ``where`` differs
    where: torch.Tensor  # flat indices of the elements kept whole
    bits: torch.Tensor  # their original bit patterns
    checksum: int  # sum of the original bit patterns, to check the restore


def _merge_in_place(weight: torch.Tensor, delta: torch.Tensor) -> _Undo:
    ints = _BITS[weight.element_size()]
    original = weight.view(ints).clone()
    weight.add_(delta)
    try:
        # int32 arithmetic wraps around; a restore adds back modulo 2**32, so it is exact even
        # then, and a wrapped difference can never pass for a small one between finite floats
        diff = original - (weight - delta).view(ints)
        checksum = int(original.sum(dtype=torch.int64))
        moved = diff.flatten().nonzero().squeeze(1)
        if moved.numel() * (moved.element_size() + original.element_size()) <= diff.numel():
            return _Undo(None, moved, original.flatten()[moved], checksum)
        small = diff.to(torch.int8)
        whole = (small.to(ints) != diff).flatten().nonzero().squeeze(1)
        return _Undo(small, whole, original.flatten()[whole], checksum)
    except BaseException:  # out of memory, interrupted: not left merged without its undo
        weight.copy_(original.view(weight.dtype))
        raise


def _unmerge_in_place(weight: torch.Tensor, delta: torch.Tensor, undo: _Undo) -> bool:
    """Restore the original bits; False if their checksum disagrees (``delta`` was not computed
    to the same bits as at the merge: the weight is then within rounding of the original)."""
    ints = _BITS[weight.element_size()]
    bits = (weight - delta).view(ints)
    if undo.residual is not None:
        bits = bits + undo.residual.to(ints)
    bits.view(-1)[undo.where] = undo.bits
    weight.copy_(bits.view(weight.dtype))
    return int(bits.sum(dtype=torch.int64)) == undo.checksum


@contextlib.contextmanager
def merged_adapter(model, *, enabled: bool = True, dtype: torch.dtype | None = None) -> Iterator[bool]:
    """Within the block, the model's active LoRA adapter is folded into its base weights
    (W + B A s, as peft's safe merge computes it), and peft's forward skips the LoRA branch.
    Afterwards the base is bit-identical to before, and gradients never see the merged weights.
    Yields whether anything was merged: nothing is for a 4-bit/8-bit base, DoRA, disabled
    adapters, or when the merge would not fit in memory (then the unmerged forward runs, as
    before).

    The merge is in place (:func:`_merge_in_place`): what it keeps to undo itself exactly is
    the few weights that ``merged - delta`` does not give back to the bit (4 MB for
    SmolLM2-135M; at most a byte per weight), not a second copy of the base (425 MB in fp32).
    The merged weight is a copy instead where ``dtype`` is not the weights' (the autocast dtype
    while sampling under bf16 autocast: autocast would cast the fp32 weight to exactly that on
    every decode step; cast once here, a decode step stops re-reading and re-writing every
    weight), and where the weight is tied to another parameter (a LoRA on an LM head that shares
    the input embedding: merged in place, the embedding would change too)."""
    layers = [(layer, _mergeable(layer)) for layer in _lora_layers(model)] if enabled else []
    layers = [(layer, names) for layer, names in layers if names]
    tied = (
        collections.Counter(q.data_ptr() for _, q in model.named_parameters(remove_duplicate=False))
        if layers
        else {}
    )
    copy = bool(layers) and dtype is not None and dtype != layers[0][0].get_base_layer().weight.dtype

    def copied(weight) -> bool:  # the layer gets its own merged parameter, not an in-place merge
        return copy or tied[weight.data_ptr()] > 1

    if layers:
        weights = [layer.get_base_layer().weight for layer, _ in layers]
        need = sum(  # a copy: whole weights; in place: at most a byte a weight to undo it
            w.numel() * ((dtype or w.dtype).itemsize if copied(w) else 1) for w in weights
        )
        if need > MEMORY_SHARE * 2 * available_memory(weights[0].device):
            log.info("not merging the adapter for sampling: %.0f MB would not fit", need / 2**20)
            layers = []
    saved: list[tuple[Any, list[str], torch.Tensor | _Undo]] = []
    try:
        # the merge itself is exact whatever autocast the caller runs under (peft's B @ A would
        # otherwise run in bf16 inside one); only a copy takes ``dtype``
        kind = layers[0][0].get_base_layer().weight.device.type if layers else "cpu"
        with torch.no_grad(), torch.autocast(kind, enabled=False):
            for layer, names in layers:
                weight = layer.get_base_layer().weight
                delta = _delta(layer, names, weight.dtype)
                if copied(weight):  # a tied weight keeps the original for what shares it
                    saved.append((layer, names, weight))
                    merged = (weight.data + delta).to(dtype or weight.dtype)
                    layer.get_base_layer().weight = nn.Parameter(merged, requires_grad=False)
                else:
                    saved.append((layer, names, _merge_in_place(weight.data, delta)))
                layer.merged_adapters.extend(names)
        yield bool(saved)
    finally:
        inexact = 0
        with torch.no_grad(), torch.autocast(kind, enabled=False):
            for layer, names, undo in saved:
                weight = layer.get_base_layer().weight
                if isinstance(undo, torch.Tensor):
                    layer.get_base_layer().weight = undo
                else:
                    inexact += not _unmerge_in_place(weight.data, _delta(layer, names, weight.dtype), undo)
                for name in names:
                    layer.merged_adapters.remove(name)
        if inexact:
            log.warning(
                "%d weights are back within rounding of their values before sampling, not to the bit "
                "(the adapter's B @ A came out differently the second time)",
                inexact,
            )


@contextlib.contextmanager
def head_in_dtype(model, dtype: torch.dtype | None) -> Iterator[bool]:
    """Within the block (no autograd), the LM head computes from a copy of its weight cast once
    to ``dtype``, the autocast dtype: under autocast its fp32 weight (SmolLM2: the 49k x 576
    tied embedding, 113 MB) is otherwise cast on every call, which is most of the head's cost
    in a decode step (28 of 32 ms at batch 16 on 2 CPU cores; docs/benchmarks.md).
    ``linear(h.to(dtype), W.to(dtype))`` is what autocast computes, so the logits are the same
    to the bit. Yields whether the head was replaced: not without autocast, for a head that is
    not a plain fp32 ``nn.Linear`` (a LoRA-wrapped head, weights already in ``dtype``), or with
    autograd on. The tied input embedding is untouched (a separate copy, not a re-typed one)."""
    head = model.get_output_embeddings() if dtype is not None else None
    if (
        head is None
        or type(head) is not nn.Linear
        or head.weight.dtype != torch.float32
        or torch.is_grad_enabled()
    ):
        yield False
        return
    weight = head.weight.detach().to(dtype)
    bias = head.bias.detach().to(dtype) if head.bias is not None else None
    head.forward = lambda x: nn.functional.linear(x.to(dtype), weight, bias)
    try:
        yield True
    finally:
        del head.forward


# a linear layer over at most this many rows (tokens) runs as W @ x.T where skinny_linears applies
SKINNY_ROWS = 64


@contextlib.contextmanager
def skinny_linears(model, device, autocast: torch.dtype | None) -> Iterator[int]:
    """Within the block (CPU, fp32, no autograd), every plain ``nn.Linear`` of the model (the
    merged base layers, the LM head) computes an input of at most SKINNY_ROWS rows as
    ``(W @ x.T).T`` instead of ``x @ W.T``: the same products, summed by MKL's kernel for a tall
    matrix times a few columns, which on 2 CPU cores runs a decode step's matmuls 1.1-1.5x faster
    (the 49k-vocabulary LM head at 64 rows: 37 -> 31 ms; docs/benchmarks.md). Results agree with
    ``F.linear`` to fp32 rounding, not to the bit. Larger inputs (prefill, training) and other
    devices or dtypes keep ``F.linear``. Yields how many layers were switched."""
    if torch.device(device).type != "cpu" or autocast is not None or torch.is_grad_enabled():
        yield 0
        return
    layers = [
        m
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and m.weight.dtype == torch.float32
        and "forward" not in m.__dict__
        and "lora_" not in name
    ]
    for layer in layers:
        layer.forward = functools.partial(_skinny_linear, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def _skinny_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = layer.weight, layer.bias
    rows = x.numel() // x.size(-1)
    if rows > SKINNY_ROWS or x.dtype != weight.dtype:
        return nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.size(0))


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


def render_prompt(tokenizer, prompt: Any) -> str:
    """A text prompt as is; a message list through the chat template, ready for the answer."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each rendered prompt (the chat template adds its own special tokens)."""
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


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
    device: str | torch.device | None = None,
    merge: bool = True,
    autocast: torch.dtype | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[Completion]:
    """One completion per prompt (given as token ids) under the model's active adapter.

    Greedy when ``params.temperature == 0``: the tokens are exactly ``model.generate``'s,
    and each comes with its log-prob. Otherwise sampled with transformers' warpers and
    ``torch.multinomial``. ``batch_size=0`` sizes batches by memory (:func:`auto_batch_size`).
    ``autocast``: compute dtype over the weights (bf16 mixed precision, Runtime.autocast_dtype;
    None: the autocast the caller runs under, if any, :func:`ambient_autocast`). ``device``:
    where the prompts go (None: the model's device).
    """
    from tqdm.auto import tqdm

    from align.backbone import is_prompt_learning

    n = len(prompt_ids)
    if n == 0:
        return []
    device = device or model_device(model)
    autocast = ambient_autocast(device, autocast)
    if is_prompt_learning(model):
        return _sample_prompt_learning(
            model, prompt_ids, params, stop, pad_id, device, autocast, desc, progress
        )
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    longest = len(prompt_ids[order[-1]]) + params.max_new_tokens
    bs = batch_size or auto_batch_size(model, longest, device=device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc=desc, unit="prompt", leave=False, disable=not progress)
    try:
        with (
            malloc.keep_freed_pages(),
            merged_adapter(model, enabled=merge, dtype=autocast),
            torch.no_grad(),
            head_in_dtype(model, autocast),
            autocast_context(device, autocast),
            skinny_linears(model, device, autocast),
        ):
            done = _Decoder(model, prompt_ids, params, stop, pad_id, device, bs, bar.update).run(order)
    finally:
        bar.close()
        model.train(was_training)
    return done


def _sample_prompt_learning(
    model, prompt_ids, p: SamplingParams, stop, pad_id, device, autocast, desc, progress
):
    """Prefix / prompt tuning: the virtual tokens exist only inside PeftModel.forward, so each
    prompt is prefilled through it on its own (no padding, whose positions peft's prompt learning
    would ignore) and decoded token by token on the base with the resulting KV cache (which holds
    the virtual tokens). Positions and logits are exactly those of one forward pass over prompt +
    completion, which training and :func:`completion_logprobs` use; peft's own ``generate`` numbers
    prefix positions differently. Slower than the batched decoder; same contract."""
    from tqdm.auto import tqdm

    greedy = p.temperature <= 0
    warpers = None if greedy else _warpers(p)
    base = model.get_base_model()
    cache_kw = cache_kwarg(base)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    stop_set = set(stop)
    try:
        with torch.no_grad(), autocast_context(device, autocast):
            for ids in tqdm(prompt_ids, desc=desc, unit="prompt", leave=False, disable=not progress):
                x = torch.tensor([list(ids)], dtype=torch.long, device=device)
                res = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
                cache, logits = _returned_cache(res), res.logits[:, -1, :].float()
                c = Completion(prompt_ids=list(ids), logprobs=[] if greedy else None)
                while True:
                    if greedy:
                        token = int(logits.argmax(-1))
                        c.logprobs.append(float(torch.log_softmax(logits, -1)[0, token]))
                    else:
                        probs = torch.softmax(warpers(None, logits), dim=-1)
                        token = int(torch.multinomial(probs, num_samples=1))
                    c.ids.append(token)
                    if token in stop_set or len(c.ids) >= p.max_new_tokens:
                        break
                    step = base(
                        input_ids=torch.tensor([[token]], device=device),
                        **{cache_kw: cache},
                        use_cache=True,
                    )
                    cache, logits = _returned_cache(step), step.logits[:, -1, :].float()
                hit = c.ids[-1] in stop_set
                c.n_tokens = len(c.ids) - (1 if hit else 0)
                c.truncated = not hit
                out.append(c)
    finally:
        model.train(was_training)
    return out


def _prompt_learning_logprobs(model, seqs, device, autocast, desc, progress) -> list[list[float]]:
    """Per-token log-probs through PeftModel.forward (which adds the virtual tokens), one
    unpadded sequence at a time; the logits of prompt tuning's virtual positions are skipped."""
    from tqdm.auto import tqdm

    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, autocast):
            for p, c in tqdm(seqs, desc=desc, unit="seq", leave=False, disable=not progress):
                if not c:
                    out.append([])
                    continue
                ids = torch.tensor([list(p) + list(c)], dtype=torch.long, device=device)
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
                offset = logits.size(0) - ids.size(1)  # prompt tuning prepends its virtual tokens
                start = offset + len(p) - 1
                lp = torch.log_softmax(logits[start : start + len(c)].float(), -1)
                out.append(lp.gather(-1, ids[0, len(p) :, None]).squeeze(-1).tolist())
    finally:
        model.train(was_training)
    return out


def autocast_context(device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def ambient_autocast(device, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """``dtype`` if given, else the dtype of an autocast the caller already runs under on
    ``device`` (None outside autocast): sampling and scoring called inside ``torch.autocast``
    then keep the merged weights and the LM head in that dtype, as if it had been passed."""
    if dtype is not None:
        return dtype
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def model_device(model) -> torch.device:
    """The device of the model's first parameter: where its inputs belong."""
    return next(model.parameters()).device


def left_pad(ids: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, left-padded to the longest."""
    width = max(map(len, ids))
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        out[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        m[row, width - len(x) :] = 1
    return out.to(device), m.to(device)


def cache_kwarg(model) -> str:
    """The forward keyword of the KV cache: ``cache`` since transformers renamed it (passing
    the old ``past_key_values`` there warns on every call), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    """The KV cache a forward returned: ``output.cache`` since transformers renamed it (reading
    ``past_key_values`` there warns), ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# tokens a KV-cache buffer grows by when it is full (one copy per this many decode steps)
CACHE_GROW = 64


@functools.cache
def _growing_layer_class():
    """A DynamicLayer whose keys/values live in a buffer with spare room along the sequence, so
    a decode step writes its token in place instead of ``torch.cat``-ing (copying) the whole
    cache, as DynamicLayer does on every step (12% of a batch-64 decode step on 2 CPU cores).
    ``keys``/``values`` are views of the buffer. Dropping rows moves only the rows that fill the
    freed slots (:func:`swap_remove` order), cropping leading columns moves the views' start, and
    the decoder's join writes the joined cache straight into a new buffer (:meth:`use_buffers`):
    none of them copies the whole cache. When code outside replaces ``keys``/``values``, the next
    update adopts the new tensors into a new buffer."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _kbuf = _vbuf = _kview = _vview = None
        _start = _end = 0  # keys/values are the buffers' tokens [_start, _end)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.size(-2)
            if not self._owns_views():
                self._adopt(key_states, value_states, n)  # first step, or replaced from outside
            elif self._end + n > self._kbuf.size(-2):
                self._adopt(key_states, value_states, n)  # full
            self._kbuf[..., self._end : self._end + n, :] = key_states
            self._vbuf[..., self._end : self._end + n, :] = value_states
            self._end += n
            self._views()
            return self.keys, self.values

        def _owns_views(self) -> bool:
            """Whether keys/values are still this layer's views of its buffers (not replaced
            from outside, as transformers' own cache methods do)."""
            return self._kbuf is not None and self.keys is self._kview and self.values is self._vview

        def _views(self) -> None:
            self.keys = self._kview = self._kbuf[..., self._start : self._end, :]
            self.values = self._vview = self._vbuf[..., self._start : self._end, :]

        def _adopt(self, key_states, value_states, incoming: int) -> None:
            """Move the current keys/values (none on the first step) into new buffers with room
            for ``incoming`` + CACHE_GROW more tokens."""
            length = self.keys.size(-2) if self.keys.dim() == 4 else 0  # lazy init: an empty 1-d tensor
            bufs = []
            for cur, new in ((self.keys, key_states), (self.values, value_states)):
                buf = new.new_empty((*new.shape[:2], length + incoming + CACHE_GROW, new.shape[3]))
                if length:
                    buf[..., :length, :] = cur
                bufs.append(buf)
            self.use_buffers(*bufs, length)

        def use_buffers(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
            """Adopt buffers whose first ``length`` tokens are the keys/values (no copy)."""
            self._kbuf, self._vbuf, self._start, self._end = kbuf, vbuf, 0, length
            self._views()

        def crop_left(self, n: int) -> None:
            """Drop the first ``n`` tokens of every row: the views start later, nothing is copied."""
            if not self._owns_views():
                self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
                return
            self._start += n
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if not self._owns_views():
                return super().batch_select_indices(indices)
            n, rows = indices.numel(), indices.tolist()
            if all(i == j or i >= n for j, i in enumerate(rows)):
                # rows kept in place, the freed slots refilled from the tail (the decoder's
                # swap-remove order): copy only the moved rows, then narrow the buffer
                span = slice(self._start, self._end)
                for j, i in enumerate(rows):
                    if i != j:
                        self._kbuf[j, :, span] = self._kbuf[i, :, span]
                        self._vbuf[j, :, span] = self._vbuf[i, :, span]
                self._kbuf, self._vbuf = self._kbuf[:n], self._vbuf[:n]
            else:
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._views()

    return GrowingLayer


def swap_remove(finished: list[bool]) -> list[int]:
    """The rows to keep, in their new order: each finished row's slot among the first
    ``n_kept`` is taken by a kept row from beyond them, the others stay where they are; so
    dropping k rows from the KV cache moves at most k rows instead of compacting all of them."""
    n = finished.count(False)
    tail = iter(r for r in range(n, len(finished)) if not finished[r])
    return [next(tail) if finished[j] else j for j in range(n)]


def _stacked_left_padded(a: torch.Tensor, b: torch.Tensor, width: int, spare: int) -> torch.Tensor:
    """(B, H, T, D) caches ``a`` then ``b`` along the batch, each left-padded with zeros to
    ``width`` tokens, in one new buffer with ``spare`` more tokens of room."""
    out = a.new_empty((a.size(0) + b.size(0), a.size(1), width + spare, a.size(3)))
    for rows, x in ((out[: a.size(0)], a), (out[a.size(0) :], b)):
        pad = width - x.size(2)
        rows[:, :, :pad].zero_()  # masked out, but must be finite: zero weights times NaN is NaN
        rows[:, :, pad:width].copy_(x)
    return out


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - mask.size(1)
    return torch.cat([mask.new_zeros(mask.size(0), pad), mask], 1) if pad else mask


class _Decoder:
    """Continuous batching over a KV cache of at most ``bs`` rows.

    Rows that finish (stop token or their own ``max_new_tokens``) leave the batch and the
    cache at once; when a quarter of the slots are free, the next prompts (shortest first) are
    prefilled and joined to the batch, left-padded to the cache's length (or the cache is
    left-padded to theirs), each row keeping its own positions. Columns that every live row
    masks out are cropped from the left, so the cache is never longer than the live rows need.
    Padding is masked, so each row's tokens are those it would get decoded alone."""

    def __init__(self, model, prompt_ids, p: SamplingParams, stop, pad_id, device, bs: int, progress):
        self.model, self.prompt_ids, self.p = model, prompt_ids, p
        self.stop_t, self.pad_id, self.device = torch.tensor(stop, device=device), pad_id, device
        self.bs, self.progress = bs, progress
        self.greedy = p.temperature <= 0
        self.warpers = None if self.greedy else _warpers(p)
        self.cache_kw = cache_kwarg(model)
        self.layer_cls = _growing_layer_class()
        self.out: list[Completion] = [Completion(prompt_ids=list(x)) for x in prompt_ids]
        self.logps: list[list[float]] = [[] for _ in prompt_ids]

    def _prefill(self, idx: list[int]):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        ids, mask = left_pad([self.prompt_ids[i] for i in idx], self.pad_id, self.device)
        pos = positions(mask)
        cache = DynamicCache(config=self.model.config)
        cache.layers = [self.layer_cls() if type(x) is DynamicLayer else x for x in cache.layers]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            **{self.cache_kw: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        live = torch.tensor(idx, device=self.device)
        return cache, mask, pos[:, -1:] + 1, out.logits[:, -1, :].float(), live

    @staticmethod
    def _can_join(cache) -> bool:
        """Only plain full-attention DynamicCache layers can be left-padded and joined."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) in (DynamicLayer, _growing_layer_class()) for layer in cache.layers)

    def _join(self, state, new):
        """The live batch with newly prefilled rows appended, both left-padded to the longer
        cache; each layer's keys and values are written once into a buffer with room to grow."""
        cache, mask, next_pos, logits, live = state
        c2, m2, p2, l2, v2 = new
        width = max(mask.size(1), m2.size(1))
        for a, b in zip(cache.layers, c2.layers, strict=True):
            spare = CACHE_GROW if isinstance(a, _growing_layer_class()) else 0
            keys = _stacked_left_padded(a.keys, b.keys, width, spare)
            values = _stacked_left_padded(a.values, b.values, width, spare)
            if spare:
                a.use_buffers(keys, values, width)
            else:
                a.keys, a.values = keys, values
        return (
            cache,
            torch.cat([_left_pad_mask(mask, width), _left_pad_mask(m2, width)]),
            torch.cat([next_pos, p2]),
            torch.cat([logits, l2]),
            torch.cat([live, v2]),
        )

    @staticmethod
    def _crop_left(cache, mask):
        unused = int(mask.any(0).long().argmax())  # leading columns every live row masks out
        if unused > 0:
            for layer in cache.layers:
                if hasattr(layer, "crop_left"):
                    layer.crop_left(unused)
                else:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            mask = mask[:, unused:]
        return mask

    def _choose(self, logits, live):
        if self.greedy:
            token = logits.argmax(-1)
            lp = (logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)).tolist()
            return token, lp
        probs = torch.softmax(self.warpers(None, logits), dim=-1)  # these warpers ignore the ids
        # draw in the order the rows joined (what the batch's order was before swap-remove
        # reordered it): a seed gives the same tokens as before
        joined = torch.argsort(self.rank[live])
        token = torch.empty(probs.size(0), dtype=torch.long, device=probs.device)
        token[joined] = torch.multinomial(probs[joined], num_samples=1).squeeze(1)
        return token, None

    def run(self, order: list[int]) -> list[Completion]:
        self.rank = torch.empty(len(self.prompt_ids), dtype=torch.long, device=self.device)
        self.rank[torch.tensor(order, device=self.device)] = torch.arange(len(order), device=self.device)
        queue = list(order)
        first, queue = queue[: self.bs], queue[self.bs :]
        cache, mask, next_pos, logits, live = self._prefill(first)
        joinable = self._can_join(cache)
        while live.numel():
            token, lp = self._choose(logits, live)
            hit = torch.isin(token, self.stop_t)
            finished: list[bool] = []
            for r, (i, t, h) in enumerate(zip(live.tolist(), token.tolist(), hit.tolist(), strict=True)):
                c = self.out[i]
                c.ids.append(t)
                if lp is not None:
                    self.logps[i].append(lp[r])
                end = h or len(c.ids) >= self.p.max_new_tokens
                if end:
                    c.n_tokens = len(c.ids) - (1 if h else 0)
                    c.truncated = not h
                    c.logprobs = self.logps[i] if self.greedy else None
                    self.progress(1)
                finished.append(end)
            keep = torch.tensor(swap_remove(finished), dtype=torch.long, device=self.device)
            if keep.numel() < live.numel():
                cache.batch_select_indices(keep)
                live, token, mask, next_pos = live[keep], token[keep], mask[keep], next_pos[keep]
                mask = self._crop_left(cache, mask)
            if live.numel():
                mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], 1)
                logits = (
                    self.model(
                        input_ids=token[:, None],
                        attention_mask=mask,
                        position_ids=next_pos,
                        **{self.cache_kw: cache},
                        use_cache=True,
                    )
                    .logits[:, -1, :]
                    .float()
                )
                next_pos = next_pos + 1
            free = self.bs - live.numel()
            # refill when a quarter of the slots are free (a cache that cannot be joined, e.g.
            # sliding-window layers, finishes its batch first)
            if queue and (not live.numel() or (joinable and free * 4 >= self.bs)):
                idx, queue = queue[:free], queue[free:]
                new = self._prefill(idx)
                if live.numel():
                    cache, mask, next_pos, logits, live = self._join(
                        (cache, mask, next_pos, logits, live), new
                    )
                else:
                    cache, mask, next_pos, logits, live = new
                    joinable = self._can_join(cache)
        return self.out


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
    device: str | torch.device | None = None,
    autocast: torch.dtype | None = None,
    desc: str = "log-probs",
    progress: bool = True,
) -> list[list[float]]:
    """Per-token log-probs (T=1) of each completion given its prompt, both as token ids, under
    the model's active adapter. Sequences are sorted by length and batched (``batch_size=0``:
    sized by memory), prompts left-padded and completions right-padded, so only completion
    positions go through the LM head (chunked, :func:`token_logprobs`)."""
    from tqdm.auto import tqdm

    from align.backbone import is_prompt_learning

    n = len(seqs)
    out: list[list[float] | None] = [None] * n
    if n == 0:
        return []
    device = device or model_device(model)
    autocast = ambient_autocast(device, autocast)
    if is_prompt_learning(model):
        return _prompt_learning_logprobs(model, seqs, device, autocast, desc, progress)
    order = sorted(range(n), key=lambda i: (len(seqs[i][0]) + len(seqs[i][1]), len(seqs[i][1])))
    longest = max(len(p) + len(c) for p, c in seqs)
    bs = batch_size or auto_batch_size(model, longest, device=device)
    was_training = model.training
    model.eval()
    try:
        with (
            malloc.keep_freed_pages(),
            torch.no_grad(),
            head_in_dtype(model, autocast),
            autocast_context(device, autocast),
            skinny_linears(model, device, autocast),
        ):
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
