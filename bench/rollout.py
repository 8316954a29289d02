"""PPO rollout throughput against plain `model.generate` with the adapter merged (the ceiling).

    python bench/rollout.py [--rounds 3] [--skip-before] [key=value ...]   # e.g. ppo.max_new_tokens=96

All in one process, on the embedded SmolLM2-135M (or `model=...`) with a LoRA adapter whose B
matrices are random (a trained-looking policy adapter), at the PPO stage's settings (composed
from `stage=ppo` plus your overrides): a round is `train.batch_size * train.grad_accum *
ppo.num_mini_batches` training prompts (reward_data/prompts_train.jsonl), sampled at
`ppo.temperature` / `ppo.top_k` / `ppo.top_p` up to `ppo.max_new_tokens`, same seed per round
for every path, under the same precision (`train.autocast`):

1. `align rollout`: `align.rl.rollout.generate` exactly as PPOTrainer calls it (policy adapter
   active; align.sampling merges it into a copy of the base while sampling, finished rows leave
   the batch);
2. `hf merged` (the ceiling): transformers' `model.generate` with the adapter merged, the
   round's prompts in one batch, the same sampling settings;
3. `hf unmerged` (what PPO did before align.sampling; `--skip-before` skips it): `model.generate`
   with the adapter active and unmerged.

Also printed: the policy forward pass PPO runs on each rollout (the log-probs the update's
ratio starts from; kept on purpose: it is the update's own code path, so the first ratio is
exactly 1) as a share of the rollout time.

Last line: `rollout_efficiency: <align rollout tokens/s / hf merged tokens/s>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from _common import REPO, compose, print_table, random_lora_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rollouts per path (different prompts)")
    ap.add_argument("--skip-before", action="store_true", help="skip the unmerged model.generate row")
    ap.add_argument("overrides", nargs="*", help="align config overrides, e.g. ppo.max_new_tokens=96")
    args = ap.parse_args()

    import torch

    from align import hardware, sampling
    from align.rl import rollout

    cfg = compose(["stage=ppo", *args.overrides])
    p, t = cfg.ppo, cfg.train
    rt, tok, model = random_lora_model(cfg)
    size = t.batch_size * t.grad_accum * p.num_mini_batches
    rows = [json.loads(x) for x in (REPO / "reward_data" / "prompts_train.jsonl").read_text().splitlines()]
    rounds = [[r["prompt"] for r in rows[i * size : (i + 1) * size]] for i in range(args.rounds)]
    stop = sampling.stop_ids(tok, model)
    pad = tok.pad_token_id
    amp = rt.autocast_dtype
    precision = contextlib.nullcontext if amp is None else lambda: torch.autocast(rt.device, dtype=amp)
    hw = hardware.describe()
    print(
        f"cpu: {hw['cpu']} | flags: {' '.join(hw['cpu_flags'])} | threads: {torch.get_num_threads()} | "
        f"cuda: {hw['cuda']} | dtype: {rt.dtype} | autocast: {amp} | {args.rounds} rounds x {size} prompts, "
        f"max {p.max_new_tokens} new tokens, temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}",
        flush=True,
    )

    def align_round(i: int) -> int:
        ro = rollout.generate(model, tok, rounds[i], p, rt.device, stop, autocast=amp)
        return int(ro.mask.sum().item())

    def hf_round(i: int) -> int:
        ids, mask = sampling.left_pad(sampling.encode_prompts(tok, rounds[i]), pad, rt.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=p.temperature,
            top_k=p.top_k or None,
            top_p=p.top_p,
            max_new_tokens=p.max_new_tokens,
            eos_token_id=stop,
            pad_token_id=pad,
        )
        generated = 0
        for row in out[:, ids.size(1) :].tolist():
            cut = next((k for k, x in enumerate(row) if x in stop), None)
            generated += len(row) if cut is None else cut + 1
        return generated

    table = []

    def measure(label: str, fn) -> float:
        tokens, wall = 0, 0.0
        fn(0)  # warm-up (allocator, kernels), not timed
        for i in range(args.rounds):
            torch.manual_seed(1000 + i)
            started = time.perf_counter()
            with torch.no_grad(), precision():
                tokens += fn(i)
            wall += time.perf_counter() - started
        table.append(
            {
                "path": label,
                "batch": size,
                "tokens": tokens,
                "wall_s": f"{wall:.1f}",
                "tok/s": f"{tokens / wall:.1f}",
            }
        )
        print(f"  {label}: {tokens} tokens in {wall:.1f} s", flush=True)
        return tokens / wall

    ours = measure("align rollout", align_round)
    with sampling.merged_adapter(model):
        ceiling = measure("hf merged (ceiling)", hf_round)
    if not args.skip_before:
        measure("hf unmerged (before)", hf_round)

    # the forward pass PPO runs after each rollout (policy log-probs for the ratio)
    fwd, gen = 0.0, 0.0
    for i in range(args.rounds):
        torch.manual_seed(1000 + i)
        started = time.perf_counter()
        with torch.no_grad(), precision():
            ro = rollout.generate(model, tok, rounds[i], p, rt.device, stop, autocast=amp)
        gen += time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad(), precision():
            for idx in torch.arange(len(rounds[i])).split(t.batch_size):
                sel = ro.select(idx)
                rollout.token_logprobs(
                    model, sel["input_ids"], sel["attention_mask"], sel["width"], p.temperature
                )
        fwd += time.perf_counter() - started
    print_table(table, ["path", "batch", "tokens", "wall_s", "tok/s"])
    print(f"policy log-prob forward: {fwd:.1f} s = {fwd / (gen + fwd):.2f} of sampling + forward")
    print(f"rollout_efficiency: {ours / ceiling:.3f}")


if __name__ == "__main__":
    sys.exit(main())
