"""SFT throughput: packed, padding-free batches vs padded batches, on the shipped SFT data.

    python bench/sft.py [--steps 6] [--batch-size 4] [--reps 2] [key=value ...]

Three `python -m align stage=sft` runs with the same model (embedded SmolLM2-135M), rows,
LoRA config, batch size (rows per step), max length, precision, learning rate and steps; only
the batching differs: padded batches in random order (what a plain TRL script does), padded
batches of similar-length rows (align's default, `train.group_by_length=true`), and packing.
Packed means TRL's best-fit-decreasing packing with padding-free batches: whole examples are
packed into rows of up to `model.max_length` tokens and a batch is one flat sequence whose
`position_ids` restart at every example (transformers builds the block-diagonal attention
mask from them, so examples never see each other).

tokens/s = real (non-padding) tokens trained on / seconds of the training loop (TRL's
`num_tokens` and `train_runtime`; model loading, tokenization and evaluation excluded).
Runs alternate, `--reps` times each. Last line:
`sft_packing_speedup: <packed / padded random-order median tokens/s>`; the line before it gives
packed vs length-grouped padded batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import PY, median, print_table, run_measured

VARIANTS = {  # name -> overrides
    "padded, random order (TRL default)": ["train.packing=false", "train.group_by_length=false"],
    "padded, length-grouped (align default)": ["train.packing=false", "train.group_by_length=true"],
    "packed (padding-free)": ["train.packing=true"],
}


def run_sft(variant: list[str], steps: int, batch: int, out: Path, overrides: list[str]) -> dict:
    r = run_measured(
        [
            PY,
            "-m",
            "align",
            "stage=sft",
            *variant,
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            f"train.logging_steps={steps}",
            "data.max_eval_rows=8",
            "tracking=disabled",
            *overrides,
            f"hydra.run.dir={out}",
        ]
    )
    if r["rc"] != 0:
        raise SystemExit(f"align stage=sft {' '.join(variant)} failed:\n{r['stderr'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    tokens, secs = m["train/num_tokens"], m["train/train_runtime"]
    return {
        "tokens": tokens,
        "tokens_s": tokens / secs,
        "s_step": secs / steps,
        "loss": m["eval/loss"],
        "rss": r["peak_rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "overrides", nargs="*", help="align config overrides for every run, e.g. model.max_length=512"
    )
    args = ap.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        for i in range(args.reps):
            for v, (name, variant) in enumerate(VARIANTS.items()):
                res = run_sft(variant, args.steps, args.batch_size, Path(tmp) / f"{v}-{i}", args.overrides)
                results[name].append(res)
                print(
                    f"  rep {i} {name}: {res['tokens_s']:.1f} tokens/s ({res['tokens']:.0f} tokens,"
                    f" {res['s_step']:.2f} s/step), eval loss {res['loss']:.3f}",
                    flush=True,
                )
    rows = [
        {
            "batches": name,
            "tokens/s (median)": f"{median([r['tokens_s'] for r in rs]):.1f}",
            "tokens/s (each)": " ".join(f"{r['tokens_s']:.1f}" for r in rs),
            "tokens/step": f"{median([r['tokens'] for r in rs]) / args.steps:.0f}",
            "s/step": f"{median([r['s_step'] for r in rs]):.2f}",
            "peak RSS MiB": f"{median([r['rss'] for r in rs]):.0f}",
            "eval loss": " ".join(f"{r['loss']:.3f}" for r in rs),
        }
        for name, rs in results.items()
    ]
    print_table(rows, list(rows[0]))
    tps = {name: median([r["tokens_s"] for r in rs]) for name, rs in results.items()}
    packed = tps["packed (padding-free)"]
    random_ = tps["padded, random order (TRL default)"]
    grouped = tps["padded, length-grouped (align default)"]
    print(f"packed vs length-grouped padded batches: {packed / grouped:.2f}x")
    print(f"sft_packing_speedup: {packed / random_:.2f}")


if __name__ == "__main__":
    main()
