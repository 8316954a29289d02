"""DPO throughput: align's dpo stage vs the plain TRL script a user would otherwise write.

Same model (embedded SmolLM2-135M), rows, LoRA config, batch size, max length, precision
(fp32 on CPU), gradient-checkpointing setting, learning rate, beta and steps; only align's
own optimisations differ (length-grouped batches; reference log-probs computed once and
cached on disk, so a rerun or a sweep job skips the reference pass). Runs alternate,
`--reps` times each; align's first run has a cold cache, later ones a warm one.

pairs/s = training pairs / seconds from building the trainer to the end of training
(tokenization, reference pass and optimisation; model loading and evaluation excluded).
Last line: `dpo_speedup: <align median pairs/s / plain TRL median pairs/s>`.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from _common import PY, median, print_table, run_measured


def run_align(steps: int, batch: int, eval_rows: int, out: Path) -> dict:
    r = run_measured(
        [
            PY,
            "-m",
            "align",
            "stage=dpo",
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            f"data.max_eval_rows={eval_rows}",
            "tracking=disabled",
            f"hydra.run.dir={out}",
        ]
    )
    if r["rc"] != 0:
        raise SystemExit(f"align run failed:\n{r['stderr'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"train_s": m["time/train_s"], "eval_acc": m["eval/rewards/accuracies"], "rss": r["peak_rss_mib"]}


def run_plain(steps: int, batch: int, eval_rows: int, out: Path) -> dict:
    r = run_measured(
        [
            PY,
            str(Path(__file__).parent / "_plain_trl_dpo.py"),
            f"--steps={steps}",
            f"--batch-size={batch}",
            f"--eval-rows={eval_rows}",
            f"--out={out}",
        ]
    )
    if r["rc"] != 0:
        raise SystemExit(f"plain TRL run failed:\n{r['stderr'][-3000:]}")
    res = json.loads(re.search(r"BENCH_RESULT (.*)", r["stdout"]).group(1))
    return {"train_s": res["train_s"], "eval_acc": res["eval_acc"], "rss": r["peak_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    pairs = args.steps * args.batch_size
    results = {"align": [], "plain TRL": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.reps):
            for name, fn in (("plain TRL", run_plain), ("align", run_align)):
                res = fn(
                    args.steps, args.batch_size, args.eval_rows, Path(tmp) / f"{name.replace(' ', '_')}-{i}"
                )
                res["pairs_s"] = pairs / res["train_s"]
                results[name].append(res)
                print(
                    f"  rep {i} {name}: {res['pairs_s']:.3f} pairs/s, held-out acc {res['eval_acc']:.3f}",
                    flush=True,
                )
    rows = []
    for name, rs in results.items():
        rows.append(
            {
                "runner": name,
                "pairs/s (median)": f"{median([r['pairs_s'] for r in rs]):.3f}",
                "pairs/s (each)": " ".join(f"{r['pairs_s']:.3f}" for r in rs),
                "peak RSS MiB": f"{median([r['rss'] for r in rs]):.0f}",
                "held-out acc": " ".join(f"{r['eval_acc']:.3f}" for r in rs),
            }
        )
    print_table(rows, list(rows[0]))
    ours = median([r["pairs_s"] for r in results["align"]])
    base = median([r["pairs_s"] for r in results["plain TRL"]])
    cold = results["align"][0]["pairs_s"] / results["plain TRL"][0]["pairs_s"]
    print(
        f"align first rep vs plain TRL: {cold:.2f}x (cold only if no earlier run cached these rows' reference log-probs)"
    )
    print(f"dpo_speedup: {ours / base:.2f}")


if __name__ == "__main__":
    main()
