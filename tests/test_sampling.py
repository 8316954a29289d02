"""align.sampling: the one generation path (eval, PPO rollouts) must give transformers'
greedy tokens, leave the base weights bit-identical, drop finished rows without changing the
others, and size its batches within a cap."""

from __future__ import annotations

import collections

import pytest
import torch

from align import sampling

PROMPTS = [
    "hello the water",
    "a",
    "bees and honey in the river of history and the ocean forest",
    "the city light sound",
    "x y z",
    "music science rain clouds sun moon stars earth wind",
]


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    """The tiny Llama with a trained-looking LoRA adapter (random B, so merging changes W)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules="all-linear")
    )
    return trained_looking(model), tok


def trained_looking(model):
    """Random LoRA B (seeded), so merging changes W; in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0.0, 0.2)
    return model.eval()


def tied_head_lora(tiny_model):
    """A LoRA on q_proj and on an LM head tied to the input embedding (as in SmolLM2), trained-looking;
    returns (peft model, base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.lm_head.weight = base.model.embed_tokens.weight
    return trained_looking(get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))), base


def encode(tok, prompts=PROMPTS):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def hf_greedy(model, prompts: list[list[int]], max_new: int, stop: list[int], pad: int) -> list[list[int]]:
    """transformers' model.generate on one left-padded batch: rows that finished keep padding
    along until the last one does (the path align.sampling replaces)."""
    ids, mask = sampling.left_pad(prompts, pad)
    width = ids.size(1)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=stop,
            pad_token_id=pad,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stop), None)
        rows.append(row if cut is None else row[: cut + 1])
    return rows


def frequent_tokens(model, tok, n: int) -> list[int]:
    """Tokens the model emits often: used as stop ids so that rows finish at different steps."""
    done = sampling.sample(
        model, encode(tok), sampling.SamplingParams(max_new_tokens=12), stop=[-1], pad_id=tok.pad_token_id
    )
    counts: dict[int, int] = {}
    for c in done:
        for t in c.ids[1:]:
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=counts.get, reverse=True)[:n]


def test_greedy_tokens_equal_transformers_generate_and_rows_finish_independently(lora_model):
    model, tok = lora_model
    stop = frequent_tokens(model, tok, 2)
    prompts = encode(tok)
    want = hf_greedy(model, prompts, 16, stop, tok.pad_token_id)
    lengths = {len(w) for w in want}
    assert len(lengths) > 1  # rows stop at different steps: the early ones leave the batch
    # one batch, and batches of 2 and 4 slots that refill as rows finish (continuous batching)
    for merge, bs in ((True, len(prompts)), (False, len(prompts)), (True, 2), (True, 4)):
        got = sampling.sample(
            model,
            prompts,
            sampling.SamplingParams(max_new_tokens=16),
            stop=stop,
            pad_id=tok.pad_token_id,
            batch_size=bs,
            merge=merge,
        )
        assert [c.ids for c in got] == want, f"merge={merge} batch_size={bs}"
        for c in got:
            assert c.truncated == (c.ids[-1] not in stop)
            assert c.n_tokens == len(c.ids) - (0 if c.truncated else 1)
    # and row by row: a row's tokens do not depend on its batch-mates
    alone = [
        sampling.sample(
            model, [p], sampling.SamplingParams(max_new_tokens=16), stop=stop, pad_id=tok.pad_token_id
        )[0].ids
        for p in prompts
    ]
    assert alone == want


def test_merging_for_sampling_leaves_the_base_bit_identical(lora_model):
    model, tok = lora_model
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    x = torch.tensor([encode(tok)[2]])
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
    with sampling.merged_adapter(model) as merged:
        assert merged
        assert all(layer.merged for layer in sampling._lora_layers(model))
        with torch.no_grad():
            inside = model(input_ids=x).logits
    torch.testing.assert_close(inside, unmerged, atol=1e-5, rtol=1e-5)  # same function
    for n, q in model.named_parameters():
        assert torch.equal(q, before[n]), n  # bit-identical, not merely close
    assert not any(layer.merged for layer in sampling._lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, unmerged)
    with model.disable_adapter(), sampling.merged_adapter(model) as merged:
        assert not merged  # nothing to merge: the base alone


def test_head_copy_in_the_autocast_dtype_gives_autocasts_logits_to_the_bit(lora_model, monkeypatch):
    """head_in_dtype: the LM head computes from a bf16 copy made once instead of autocast's cast
    on every call; logits, greedy tokens and their log-probs are identical, and the head is
    itself again afterwards (fp32 weight untouched, no instance forward left behind)."""
    import contextlib

    model, tok = lora_model
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    x = torch.tensor([encode(tok)[2]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=x).logits
        with sampling.head_in_dtype(model, torch.bfloat16) as replaced:
            assert replaced
            got = model(input_ids=x).logits
    assert torch.equal(got, want)
    assert "forward" not in vars(head)
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, weight)
    with sampling.head_in_dtype(model, torch.bfloat16) as replaced:
        assert not replaced  # autograd on: the head must stay the trained one
    with torch.no_grad(), sampling.head_in_dtype(model, None) as replaced:
        assert not replaced  # no autocast: nothing to cast

    def decode():
        return sampling.sample(
            model,
            encode(tok),
            sampling.SamplingParams(max_new_tokens=8),
            stop=[-1],
            pad_id=tok.pad_token_id,
            autocast=torch.bfloat16,
            progress=False,
        )

    fast = decode()
    monkeypatch.setattr(sampling, "head_in_dtype", lambda m, d: contextlib.nullcontext(False))
    slow = decode()
    assert [c.ids for c in fast] == [c.ids for c in slow]
    assert [c.logprobs for c in fast] == [c.logprobs for c in slow]


def test_sampling_inside_an_autocast_takes_its_dtype(lora_model, monkeypatch):
    """Called inside ``torch.autocast`` without ``autocast=``, sample() and
    completion_logprobs() run as if the autocast dtype had been passed (merged copy and head in
    bf16): the same tokens and log-probs to the bit; outside any autocast, nothing is cast."""
    model, tok = lora_model
    seen = []
    real = sampling.head_in_dtype
    monkeypatch.setattr(sampling, "head_in_dtype", lambda m, d: seen.append(d) or real(m, d))
    assert sampling.ambient_autocast("cpu") is None
    assert sampling.ambient_autocast("cpu", torch.float16) is torch.float16  # explicit wins
    params = sampling.SamplingParams(max_new_tokens=8)
    kw = dict(stop=[-1], pad_id=tok.pad_token_id, progress=False)
    passed = sampling.sample(model, encode(tok), params, autocast=torch.bfloat16, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampling.ambient_autocast("cpu") is torch.bfloat16
        ambient = sampling.sample(model, encode(tok), params, **kw)
        seqs = [(c.prompt_ids, c.ids) for c in ambient]
        lp_ambient = sampling.completion_logprobs(model, seqs, progress=False)
    lp_passed = sampling.completion_logprobs(model, seqs, autocast=torch.bfloat16, progress=False)
    assert seen == [torch.bfloat16] * 4
    assert [c.ids for c in ambient] == [c.ids for c in passed]
    assert [c.logprobs for c in ambient] == [c.logprobs for c in passed]
    assert lp_ambient == lp_passed
    sampling.sample(model, encode(tok), params, **kw)
    assert seen[-1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-4, 5e-3])
def test_in_place_merge_undoes_to_the_bit_where_rounding_is_large(dtype, scale):
    """The in-place merge keeps the few weights that ``merged - delta`` does not give back (a
    small delta) or an int8 per weight (a large one), and the whole original where that cannot
    hold the rounding: zeros, weights far smaller than their delta, sign changes, -0.0."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=g) * 0.02).to(dtype)
    weight[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-9, -1e-9, 3e-3, -3e-3]).to(dtype)
    delta = (torch.randn(64, 48, generator=g) * scale).to(dtype)
    delta[0, :8] = torch.tensor([1.0, -1.0, 5e-3, -5e-3, 2e-3, 7e-3, -4e-3, 4e-3]).to(dtype)
    original = weight.clone()
    undo = sampling._merge_in_place(weight, delta)
    assert torch.equal(weight, original + delta)  # the merged weight is W + delta, as a copy would be
    if scale == 5e-3:  # many weights round: a byte each
        assert undo.residual.dtype == torch.int8
        assert 0 < undo.where.numel() < weight.numel() // 10  # the exceptions are exercised, and rare
    else:  # few round: only those are kept
        assert undo.residual is None
        assert 8 <= undo.where.numel() < weight.numel() // 12
    assert sampling._unmerge_in_place(weight, delta, undo)
    assert torch.equal(
        weight.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        original.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )


def test_a_lora_on_a_head_tied_to_the_embedding_merges_into_a_copy(tiny_model):
    """Merged in place, a LoRA on an LM head that shares its weight with the input embedding
    would change the embedding too; that layer merges into a copy, the rest in place."""
    model, base = tied_head_lora(tiny_model)
    embedding = base.model.embed_tokens.weight
    before = embedding.detach().clone()
    x = torch.tensor([[5, 17, 40, 99, 230]])
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
    with sampling.merged_adapter(model) as merged, torch.no_grad():
        assert merged
        assert torch.equal(base.model.embed_tokens.weight, before)
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied afterwards
    assert torch.equal(embedding, before)


def test_the_fit_check_counts_a_tied_heads_copy_in_full(tiny_model, monkeypatch):
    """In place, a merge keeps at most a byte a weight to undo itself; a tied head's merge is a
    whole fp32 copy, and the memory check must count it so."""
    model, base = tied_head_lora(tiny_model)
    q = [m.get_base_layer().weight.numel() for n, m in model.named_modules() if n.endswith("q_proj")]
    head = base.lm_head.weight.numel()
    in_place_only = sum(q) + head  # the old estimate: a byte per weight everywhere
    with_copy = sum(q) + 4 * head
    budget = (in_place_only + with_copy) // 2  # fits the old estimate, not the copy
    monkeypatch.setattr(sampling, "available_memory", lambda device: budget / (sampling.MEMORY_SHARE * 2))
    with sampling.merged_adapter(model) as merged:
        assert not merged
    monkeypatch.setattr(sampling, "available_memory", lambda device: with_copy / (sampling.MEMORY_SHARE * 2))
    with sampling.merged_adapter(model) as merged:
        assert merged


def test_a_restore_that_is_not_to_the_bit_says_so(lora_model, monkeypatch, caplog):
    """The restore recomputes B A s; should that come out differently (a matmul that is not
    deterministic), the checksum notices and the run says so instead of passing silently."""
    import copy

    model = copy.deepcopy(lora_model[0])
    calls = []
    real = sampling._delta

    def drifting(layer, names, dtype):  # the second computation of each delta is off by 1e-3
        calls.append(layer)
        d = real(layer, names, dtype)
        return d * (1 + 1e-3) if calls.count(layer) > 1 else d

    monkeypatch.setattr(sampling, "_delta", drifting)
    with caplog.at_level("WARNING", logger="align.sampling"), sampling.merged_adapter(model) as merged:
        assert merged
    assert "within rounding" in caplog.text


def test_merge_is_skipped_when_the_copy_does_not_fit(lora_model, monkeypatch):
    model, _ = lora_model
    monkeypatch.setattr(sampling, "available_memory", lambda device: 1)
    with sampling.merged_adapter(model) as merged:
        assert not merged
        assert not any(layer.merged for layer in sampling._lora_layers(model))


def test_decoding_logprobs_equal_a_forward_pass(lora_model):
    model, tok = lora_model
    done = sampling.sample(
        model, encode(tok), sampling.SamplingParams(max_new_tokens=10), stop=[-1], pad_id=tok.pad_token_id
    )
    forward = sampling.completion_logprobs(model, [(c.prompt_ids, c.ids) for c in done], batch_size=4)
    for c, lp in zip(done, forward, strict=True):
        assert len(c.logprobs) == len(lp) == len(c.ids) == 10
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lp), atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_top_k_1_is_greedy(lora_model):
    model, tok = lora_model
    prompts = encode(tok)
    hot = sampling.SamplingParams(max_new_tokens=10, temperature=1.5)

    def draw(params, seed):
        torch.manual_seed(seed)
        return [c.ids for c in sampling.sample(model, prompts, params, stop=[-1], pad_id=tok.pad_token_id)]

    assert draw(hot, 3) == draw(hot, 3)
    assert draw(hot, 3) != draw(hot, 4)
    greedy = draw(sampling.SamplingParams(max_new_tokens=10), 0)
    assert draw(sampling.SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1), 5) == greedy


def test_memory_sized_batch_stays_within_the_cap(lora_model, monkeypatch):
    model, _ = lora_model
    row = sampling.bytes_per_row(model, 200)
    assert row > 0
    monkeypatch.setattr(sampling, "available_memory", lambda device: 10**15)
    assert sampling.auto_batch_size(model, 200) == sampling.MAX_BATCH
    assert sampling.auto_batch_size(model, 200, cap=5) == 5
    monkeypatch.setattr(sampling, "available_memory", lambda device: 0)
    assert sampling.auto_batch_size(model, 200) == 1
    monkeypatch.setattr(sampling, "available_memory", lambda device: int(7.5 * row / sampling.MEMORY_SHARE))
    assert sampling.auto_batch_size(model, 200) == 7
    # longer sequences need more memory a row: never a larger batch
    assert sampling.auto_batch_size(model, 2000) <= 7


def test_growing_cache_layer_writes_in_place_and_matches_dynamic_layer():
    """The decoder's KV-cache layer holds what transformers' DynamicLayer holds after every
    update, row drop and outside replacement (join/pad/crop), and a decode step writes its
    token into the buffer instead of copying the cache."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    grow, ref = sampling._growing_layer_class()(), DynamicLayer()

    def step(n, batch=4):
        k, v = torch.randn(batch, 2, n, 8), torch.randn(batch, 2, n, 8)
        a, b = grow.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    step(5)  # prefill
    buffer = grow._kbuf.data_ptr()
    for _ in range(sampling.CACHE_GROW):
        step(1)
    assert grow._kbuf.data_ptr() == buffer  # 64 decode steps fit the first buffer: no copies
    step(1)  # the 65th grows it
    assert grow._kbuf.size(-2) >= 5 + sampling.CACHE_GROW + 1
    keep = torch.tensor([0, 2, 3])
    grow.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    step(1, batch=3)
    for layer in (grow, ref):  # what _Decoder._crop_left / _join do from outside
        layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
    step(1, batch=3)
    assert grow.get_seq_length() == ref.get_seq_length() == 5 + sampling.CACHE_GROW + 1 + 2 - 3


def test_swap_remove_fills_freed_slots_from_the_tail():
    assert sampling.swap_remove([False, True, False, True, False, False]) == [0, 4, 2, 5]
    assert sampling.swap_remove([False, False, True]) == [0, 1]
    assert sampling.swap_remove([True, True]) == []
    assert sampling.swap_remove([True, False, False]) == [2, 1]


def test_cache_drops_crops_and_joins_without_copying_the_whole_cache():
    """Dropping rows (swap-remove order), cropping leading columns and joining new rows give
    what transformers' DynamicLayer holds, and the first two keep the buffer they had."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    grow, ref = sampling._growing_layer_class()(), DynamicLayer()

    def step(n, batch):
        k, v = torch.randn(batch, 2, n, 8), torch.randn(batch, 2, n, 8)
        a, b = grow.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    step(5, batch=6)
    step(1, batch=6)
    buffer = grow._kbuf.data_ptr()
    keep = torch.tensor(sampling.swap_remove([False, True, False, True, False, False]))
    grow.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)
    grow.crop_left(2)
    ref.keys, ref.values = ref.keys[:, :, 2:], ref.values[:, :, 2:]
    step(1, batch=4)
    assert grow._kbuf.data_ptr() == buffer  # rows moved and columns cropped in place
    # join two new rows with a longer cache: both left-padded with zeros to the longer one
    k2, v2 = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    keys = sampling._stacked_left_padded(grow.keys, k2, 7, sampling.CACHE_GROW)
    values = sampling._stacked_left_padded(grow.values, v2, 7, sampling.CACHE_GROW)
    grow.use_buffers(keys, values, 7)
    pad = ref.keys.new_zeros(4, 2, 7 - ref.keys.size(2), 8)
    ref.keys = torch.cat([torch.cat([pad, ref.keys], 2), k2])
    ref.values = torch.cat([torch.cat([pad, ref.values], 2), v2])
    assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)
    joined = grow._kbuf.data_ptr()
    step(1, batch=6)
    assert grow._kbuf.data_ptr() == joined  # the joined buffer has room: the next token is written in place


def test_skinny_linears_give_f_linear_results_and_restore_the_layers(lora_model):
    model, tok = lora_model
    ids = torch.tensor(encode(tok, ["hello the water", "x y z a"])[1:] * 3)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with sampling.skinny_linears(model, "cpu", None) as n:
            assert n > 0
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with sampling.skinny_linears(model, "cpu", torch.bfloat16) as n:  # autocast: untouched
            assert n == 0
    with sampling.skinny_linears(model, "cpu", None) as n:  # autograd on: untouched
        assert n == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_seed_draws_the_same_tokens_whatever_order_finished_rows_leave_in(lora_model, monkeypatch):
    """Swap-remove reorders the batch; sampled rows still draw in the order they joined, so a
    seed gives the tokens that the old in-order compaction gave."""
    model, tok = lora_model
    hot = sampling.SamplingParams(max_new_tokens=12, temperature=1.3)

    def draw(bs, stop):
        torch.manual_seed(7)
        done = sampling.sample(model, encode(tok), hot, stop=stop, pad_id=tok.pad_token_id, batch_size=bs)
        return [c.ids for c in done]

    counts = collections.Counter(t for ids in draw(6, [-1]) for t in ids[2:])
    stop = [t for t, _ in counts.most_common(3)]  # tokens these draws emit: rows end at different steps
    swapped = {bs: draw(bs, stop) for bs in (3, 6)}
    assert len({len(ids) for ids in swapped[6]}) > 1  # rows left at different steps
    monkeypatch.setattr(
        sampling, "swap_remove", lambda finished: [r for r, f in enumerate(finished) if not f]
    )
    assert {bs: draw(bs, stop) for bs in (3, 6)} == swapped
