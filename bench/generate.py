"""Generation throughput of align's sampling path against plain transformers and the hardware.

    python bench/generate.py [--prompts 200] [--max-new-tokens 128] [--batches 8,32,64] [key=value ...]

All in one process, on the embedded SmolLM2-135M (or `model=...`) with a LoRA adapter whose
B matrices are random (a trained-looking adapter, active as in eval and PPO), greedy, the same
held-out prompts (reward_data/prompts_test.jsonl) for every row:

1. `align`  : align.sampling.sample (adapter merged for sampling, length-sorted prompts,
              finished rows dropped) at each batch size in --batches and at its default
              (memory-sized) batch;
2. `hf unmerged`: transformers' model.generate with the adapter active and unmerged, batches of 8
              sorted by length: what `stage=eval` and PPO did before align.sampling;
3. `hf merged`: model.generate on the same prompts with the adapter merged (the usual ceiling);
4. the hardware bound for the same work: one forward of batch 1 and one token with the
   weights merged (every weight read once: the floor of any decode step) and the FLOP rate of
   a large matmul in the same dtype and thread count. Bound time = prompt tokens x 2 x body
   parameters / FLOP rate + (generated tokens / batch) x max(weight-read time,
   batch x 2 x parameters / FLOP rate); attention and sampling are not counted (generous).

Last line: `generate_efficiency: <align tokens/s at its default batch / bound tokens/s>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

from _common import REPO, compose, print_table, random_lora_model


def time_best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def hf_generate(model, prompt_ids, max_new_tokens, batch_size, stop, pad) -> int:
    """What align's eval did before align.sampling: model.generate on length-sorted batches."""
    import torch

    from align.sampling import left_pad

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    generated = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompt_ids[i] for i in idx], pad)
            width = ids.size(1)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad,
                top_k=None,
                temperature=None,
                top_p=None,
            )
            for row in out[:, width:].tolist():
                cut = next((k for k, t in enumerate(row) if t in stop), None)
                generated += len(row) if cut is None else cut + 1
    return generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts (200: stage=eval's workload)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--skip-hf", action="store_true", help="skip the two model.generate rows (faster)")
    ap.add_argument("overrides", nargs="*", help="align config overrides, e.g. model=qwen2.5-0.5b")
    args = ap.parse_args()

    import torch

    from align import hardware, sampling

    cfg = compose(["stage=eval", *args.overrides])
    rt, tok, model = random_lora_model(cfg)
    rows = [json.loads(x) for x in (REPO / "reward_data" / "prompts_test.jsonl").read_text().splitlines()]
    prompts = sampling.encode_prompts(tok, [r["prompt"] for r in rows[: args.prompts]])
    stop = sampling.stop_ids(tok, model)
    pad = tok.pad_token_id
    params = sampling.SamplingParams(max_new_tokens=args.max_new_tokens)
    default_bs = sampling.auto_batch_size(
        model, max(map(len, prompts)) + args.max_new_tokens, device=rt.device
    )
    amp = rt.autocast_dtype  # train.autocast: bf16 where native (every path below alike); =none: fp32
    precision = contextlib.nullcontext if amp is None else lambda: torch.autocast(rt.device, dtype=amp)
    hw = hardware.describe()
    print(
        f"cpu: {hw['cpu']} | flags: {' '.join(hw['cpu_flags'])} | threads: {torch.get_num_threads()} | "
        f"cuda: {hw['cuda']} | dtype: {rt.dtype} | autocast: {amp} | prompts: {len(prompts)} x max {args.max_new_tokens} new tokens",
        flush=True,
    )

    table = []

    def measure(label: str, batch: int, fn) -> float:
        t = time.perf_counter()
        with precision():
            generated = fn()
        wall = time.perf_counter() - t
        table.append(
            {
                "path": label,
                "batch": batch,
                "tokens": generated,
                "wall_s": f"{wall:.1f}",
                "tok/s": f"{generated / wall:.1f}",
            }
        )
        print(f"  {label} batch {batch}: {generated} tokens in {wall:.1f} s", flush=True)
        return generated / wall

    def align_run(bs):
        out = sampling.sample(model, prompts, params, stop=stop, pad_id=pad, batch_size=bs, progress=False)
        return sum(len(c.ids) for c in out)

    # one short untimed run first: the first sampling call in a process pays one-time costs
    # (allocator growth, lazy imports, the first merge) that would otherwise land on the first row
    with precision():
        sampling.sample(
            model,
            prompts[:8],
            sampling.SamplingParams(max_new_tokens=8),
            stop=stop,
            pad_id=pad,
            progress=False,
        )
    batches = [int(b) for b in args.batches.split(",") if b]
    align_tps = {}
    for bs in sorted(set(batches + [default_bs])):
        align_tps[bs] = measure(
            "align" + (" (default)" if bs == default_bs else ""), bs, lambda bs=bs: align_run(bs)
        )
    completions = sampling.sample(
        model, prompts, params, stop=stop, pad_id=pad, batch_size=default_bs, progress=False
    )
    generated = sum(len(c.ids) for c in completions)
    if not args.skip_hf:
        measure(
            "hf unmerged (before)", 8, lambda: hf_generate(model, prompts, args.max_new_tokens, 8, stop, pad)
        )
        with sampling.merged_adapter(model):
            measure(
                "hf merged",
                default_bs,
                lambda: hf_generate(model, prompts, args.max_new_tokens, default_bs, stop, pad),
            )

    # the hardware bound for this work
    body = sum(q.numel() for n, q in model.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    all_params = body + (head if tied else 0)  # the LM head's matmul runs once per decoded token
    dtype = amp or rt.dtype
    a, b = (torch.randn(args.matmul_n, args.matmul_n, dtype=dtype) for _ in range(2))
    rate = 2 * args.matmul_n**3 / time_best(lambda: a @ b, 3)
    one = torch.tensor([[prompts[0][-1]]])
    with sampling.merged_adapter(model), torch.no_grad(), precision():
        t_read = statistics.median(
            [time_best(lambda: model(input_ids=one, use_cache=False, logits_to_keep=1), 1) for _ in range(10)]
        )
    prompt_tokens = sum(map(len, prompts))
    print(
        f"hardware: matmul {rate / 1e9:.1f} GFLOP/s ({args.matmul_n}^2, {dtype}); one forward of batch 1 "
        f"(every weight read once) {t_read * 1e3:.1f} ms; {all_params / 1e6:.1f}M parameters per decoded token"
    )

    def bound_tps(bs: int) -> float:
        step = max(t_read, bs * 2 * all_params / rate)
        t = prompt_tokens * 2 * body / rate + (generated / bs) * step
        return generated / t

    for bs in sorted(align_tps):
        table.append(
            {"path": "hardware bound", "batch": bs, "tokens": generated, "tok/s": f"{bound_tps(bs):.1f}"}
        )
    print_table(table, ["path", "batch", "tokens", "wall_s", "tok/s"])
    print(f"default_batch: {default_bs}")
    print(f"generate_efficiency: {align_tps[default_bs] / bound_tps(default_bs):.3f}")


if __name__ == "__main__":
    sys.exit(main())
