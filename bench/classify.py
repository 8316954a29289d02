"""stage=classify throughput: packed vs padded batches, on the shipped code-defect set.

    python bench/classify.py [--steps 8] [--batch-size 16] [--reps 1] [key=value ...]

Three `python -m align stage=classify` runs with the same model (embedded SmolLM2-135M),
rows, LoRA config, batch size (functions per step), max length, precision, learning rate and
steps; only the batching differs: padded batches in random order, padded batches of
similar-length functions (`train.group_by_length=true`), and packing (`classify.packing=true`:
first-fit-decreasing into rows of up to `model.max_length` tokens, position ids restarting
per function, block-diagonal causal attention, a prediction at each function's last token).

examples/s = functions trained on / seconds of the training loop (the Trainer's
`train_runtime`; model loading, tokenization and evaluation excluded). Runs alternate,
`--reps` times each. The machine's CPU is printed first: compare only ratios from one run.
Last line: `classify_packing_speedup: <packed / best padded median examples/s>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import PY, REPO, median, print_table, run_measured

VARIANTS = {  # name -> overrides
    "padded, random order": ["classify.packing=false", "train.group_by_length=false"],
    "padded, length-grouped": ["classify.packing=false", "train.group_by_length=true"],
    "packed": ["classify.packing=true"],
}


def run_classify(variant: list[str], steps: int, batch: int, out: Path, overrides: list[str]) -> dict:
    r = run_measured(
        [
            PY,
            "-m",
            "align",
            "stage=classify",
            *variant,
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            f"train.logging_steps={steps}",
            "train.save_steps=0",
            "data.max_eval_rows=8",
            "tracking=disabled",
            *overrides,
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
    )
    if r["rc"] != 0:
        raise SystemExit(f"align stage=classify {' '.join(variant)} failed:\n{r['stderr'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    secs = m["train/train_runtime"]
    return {
        "ex_s": steps * batch / secs,
        "s_step": secs / steps,
        "loss": m["train/loss"],
        "rss": r["peak_rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument(
        "overrides", nargs="*", help="align config overrides for every run, e.g. model.max_length=512"
    )
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(REPO))
    from align import hardware

    hw = hardware.describe()
    print(
        f"cpu: {hw.get('cpu')} (bf16 native: {hw.get('cpu_bf16')}); overrides: {' '.join(args.overrides) or '-'}"
    )
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="classify-bench-") as tmp:
        for i in range(args.reps):
            for v, (name, variant) in enumerate(VARIANTS.items()):
                res = run_classify(
                    variant, args.steps, args.batch_size, Path(tmp) / f"{v}-{i}", args.overrides
                )
                results[name].append(res)
                print(
                    f"  rep {i} {name}: {res['ex_s']:.2f} examples/s ({res['s_step']:.2f} s/step)", flush=True
                )
    rows = [
        {
            "batches": name,
            "examples/s (median)": f"{median([r['ex_s'] for r in rs]):.2f}",
            "examples/s (each)": " ".join(f"{r['ex_s']:.2f}" for r in rs),
            "s/step": f"{median([r['s_step'] for r in rs]):.2f}",
            "peak RSS MiB": f"{median([r['rss'] for r in rs]):.0f}",
            "last train loss": " ".join(f"{r['loss']:.3f}" for r in rs),
        }
        for name, rs in results.items()
    ]
    print_table(rows, list(rows[0]))
    eps = {name: median([r["ex_s"] for r in rs]) for name, rs in results.items()}
    packed = eps["packed"]
    best = max(eps["padded, random order"], eps["padded, length-grouped"])
    print(f"packed vs padded random order: {packed / eps['padded, random order']:.2f}x")
    print(f"packed vs padded length-grouped: {packed / eps['padded, length-grouped']:.2f}x")
    print(f"classify_packing_speedup: {packed / best:.2f}")


if __name__ == "__main__":
    main()
