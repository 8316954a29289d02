"""Model-FLOP utilisation of an align training step, CPU or GPU.

    python bench/flops.py [--batch-size 4] [--seq-len 256] [--steps 5] [key=value ...]

Builds the stage backbone exactly as `stage=sft` does (embedded SmolLM2-135M + LoRA by
default, the runtime's device and precision; `adapter=qlora` for a 4-bit base), then:

1. counts the FLOPs of one training step (forward + backward of a batch of `--batch-size`
   sequences of `--seq-len` tokens) with torch's FlopCounterMode: the matmuls and attention
   actually executed, so LoRA's skipped weight gradients of the frozen base are not counted;
2. times `--steps` such steps (forward, backward, AdamW on the trainable parameters) after
   one warm-up step -> achieved FLOP/s;
3. times a large square matmul in the same process, dtype and thread count -> the machine's
   practical peak FLOP/s.

MFU = achieved / peak. Also printed: the "6 x parameters x tokens" convention that papers
quote for full fine-tuning, for comparison. Last line: `mfu: <achieved / matmul FLOP/s>`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

from _common import REPO, compose


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: str, dtype, n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size (default 2048 on CPU, 8192 on GPU)")
    ap.add_argument("overrides", nargs="*", help="align config overrides, e.g. adapter=qlora")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))

    import torch
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from align import backbone

    cfg = compose(["stage=sft", "tracking=disabled", *args.overrides])
    bb = backbone.build(cfg)
    rt = bb.runtime
    model = get_peft_model(bb.model, bb.peft_config) if bb.peft_config is not None else bb.model
    if rt.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(rt.device)
    autocast = (
        torch.autocast(rt.device, dtype=rt.autocast_dtype) if rt.autocast_dtype else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()  # warm-up
    times = []
    for _ in range(args.steps):
        sync(rt.device)
        t = time.perf_counter()
        step()
        sync(rt.device)
        times.append(time.perf_counter() - t)
    s_step = statistics.median(times)
    achieved = flops / s_step

    compute_dtype = rt.autocast_dtype or rt.dtype  # what the step's matmuls run in (qlora: dequantized)
    n = args.matmul_n or (8192 if rt.device == "cuda" else 2048)
    peak = matmul_flops_per_s(rt.device, compute_dtype, n, reps=5)

    tokens = args.batch_size * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    six_n = 6 * n_params * tokens / s_step
    where = torch.cuda.get_device_name() if rt.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nMFU, {cfg.model.name} + {cfg.adapter.kind.value} on {where}, compute {compute_dtype}:")
    rows = [
        ("tokens per step", f"{tokens}"),
        ("counted FLOPs per step (fwd+bwd)", f"{flops / 1e9:.3g} GFLOP"),
        ("seconds per step (median)", f"{s_step:.3f}"),
        ("tokens/s", f"{tokens / s_step:.1f}"),
        ("achieved FLOP/s", f"{achieved / 1e9:.3g} GFLOP/s"),
        (f"matmul {n}x{n} FLOP/s (peak)", f"{peak / 1e9:.1f} GFLOP/s"),
        (
            "6 x params x tokens / s (full-FT convention)",
            f"{six_n / 1e9:.1f} GFLOP/s ({six_n / peak:.3f} of peak)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"flops_per_step: {flops}")
    print(f"mfu: {achieved / peak:.3f}")


if __name__ == "__main__":
    main()
