"""Results table for stage=classify on the shipped code-defect set, like arXiv 2401.17010's:
balanced vs imbalanced (10% defective) x (cross-entropy, focal, focal + class weights).

    .venv/bin/python examples/classify_table.py                      # 6 runs, ~7.5 min each on 2 cores
    .venv/bin/python examples/classify_table.py --steps 40 --batch-size 8 classify.packing=true
    .venv/bin/python examples/classify_table.py --smoke              # 1 step each, 16 eval rows

Every run is ``python -m align stage=classify data=<set> <loss> train.max_steps=<steps>
data.max_eval_rows=null`` (all 400 held-out functions, from templates the training set lacks)
into ``--out`` (default ``outputs/classify-table/<time>``); extra ``key=value`` arguments go to
every run. The table (markdown) is printed and written to ``<out>/results.md``.
``F1 tuned`` is F1 at the threshold that maximises it on the same held-out rows (what the run
saves for later predictions): an optimistic number; ``stage=eval`` on another file reports F1
at that saved threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

DATASETS = [("balanced", "defects"), ("imbalanced (10%)", "defects_imbalanced")]
LOSSES = [
    ("cross-entropy", ["classify.loss=ce"]),
    ("focal (gamma 1)", ["classify.loss=focal", "classify.focal_gamma=1.0"]),
    (
        "focal + class weights",
        ["classify.loss=focal", "classify.focal_gamma=1.0", "classify.class_weights=auto"],
    ),
]
COLUMNS = [
    ("ROC AUC", "eval/roc_auc"),
    ("PR AUC", "eval/pr_auc"),
    ("F1 @0.5", "eval/f1"),
    ("F1 tuned", "eval/f1_tuned"),
    ("threshold", "eval/threshold"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="train.max_steps of every run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--smoke", action="store_true", help="1 step and 16 eval rows per run (checks the script)"
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out or REPO / "outputs" / "classify-table" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    steps = 1 if args.smoke else args.steps
    rows = []
    for set_name, data in DATASETS:
        for loss_name, loss in LOSSES:
            run_dir = out / f"{data}-{loss_name.split()[0]}{'-w' if 'weights' in loss_name else ''}"
            if not (run_dir / "artifact.json").is_file():
                cmd = [
                    PY,
                    "-m",
                    "align",
                    "stage=classify",
                    f"data={data}",
                    *loss,
                    f"train.max_steps={steps}",
                    f"train.batch_size={args.batch_size}",
                    "data.max_eval_rows=" + ("16" if args.smoke else "null"),
                    *args.overrides,
                    f"hydra.run.dir={run_dir}",
                ]
                print("$", " ".join(cmd[1:]), flush=True)
                r = subprocess.run(cmd, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"failed ({r.returncode}):\n{r.stderr[-3000:]}")
            m = json.loads((run_dir / "metrics.json").read_text())
            row = {"data": set_name, "loss": loss_name}
            row |= {name: f"{m.get(key, float('nan')):.3f}" for name, key in COLUMNS}
            row["train s"] = f"{m.get('time/train_s', float('nan')):.0f}"
            row["wall s"] = f"{m.get('time/wall_s', float('nan')):.0f}"
            rows.append(row)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    cols = list(rows[0])
    table = "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        + ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    )
    from align import hardware

    hw = hardware.describe()
    text = (
        f"{table}\n\n{steps} steps x {args.batch_size} functions, "
        f"overrides: {' '.join(args.overrides) or '-'}; cpu: {hw.get('cpu')}\n"
    )
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
