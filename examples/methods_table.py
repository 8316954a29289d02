"""Methods table: every fine-tuning method align has, trained with the same steps and data on the
embedded SmolLM2-135M, then evaluated by stage=eval (train.eval_at_end) on the same held-out data,
with the forgetting check; plus one row that repeats the method that forgot most with data.replay.

    .venv/bin/python examples/methods_table.py                       # hours of CPU in all
    .venv/bin/python examples/methods_table.py --steps 72 --only lora freeze-2 prompt
    .venv/bin/python examples/methods_table.py --smoke --only lora ia3   # 2 steps, data=tiny

Every run shells out to ``python -m align stage=sft ...`` (the command a user types), into
``--out`` (default ``outputs/methods/<time>``), under a small wrapper that reports the peak RSS of
that one process tree; the table goes to ``<out>/methods.md`` and is printed. Columns:

* trainable parameters and adapter size on disk (artifact.json ``adapter.trainable_params`` and
  ``adapter.size_bytes``: the saved weights; a full fine-tune saves the whole model);
* peak RSS of the training run (training + its eval_at_end), seconds per training step (the
  Trainer's ``train_runtime`` / steps);
* held-out instruction-following accuracy (strict judges, prompt level and instruction level);
* the three forgetting figures: general-text perplexity ratio tuned/base, KL(base || tuned) per
  token on the base's greedy answers, share of known short answers kept (docs/methods.md).

Learning rates differ by method (a soft prompt needs a far larger step than a full fine-tune);
each is that method's usual range, printed with the table and overridable with ``--lr name=value``.
A finished run directory is reused, so an interrupted table continues with the same ``--out``.
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
REPLAY_FILE = REPO / "reward_data" / "general_sft.jsonl"

# (name, label, overrides, lr)
METHODS = [
    ("full", "full fine-tuning", ["adapter=none"], 2e-5),
    ("lora", "LoRA r=16", ["adapter=lora"], 2e-4),
    ("dora", "DoRA r=16", ["adapter=dora"], 2e-4),
    ("qlora", "QLoRA r=16 (4-bit NF4 base)", ["adapter=qlora"], 2e-4),
    ("freeze-2", "layer freezing, top 2 blocks", ["adapter=freeze", "adapter.train_layers=2"], 5e-5),
    ("freeze-4", "layer freezing, top 4 blocks", ["adapter=freeze", "adapter.train_layers=4"], 5e-5),
    ("prefix", "prefix tuning, 20 tokens", ["adapter=prefix", "adapter.num_virtual_tokens=20"], 1e-2),
    ("prompt", "prompt tuning, 20 tokens", ["adapter=prompt", "adapter.num_virtual_tokens=20"], 3e-2),
    ("ia3", "IA3", ["adapter=ia3"], 3e-3),
]

# a small program that runs one command and prints the peak RSS of its process tree (the align
# process re-executes itself once with jemalloc: same pid, so it is still this child)
RSS_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
    "sys.exit(r.returncode)"
)


def run_align(args: list[str], run_dir: Path, log: Path) -> dict:
    """``python -m align <args>`` into ``run_dir`` under the RSS wrapper; returns
    ``{"peak_rss_mb": ..., "wall_s": ...}`` (recorded in ``run_dir/methods_run.json`` for reuse)."""
    record = run_dir / "methods_run.json"
    if (run_dir / "artifact.json").is_file() and record.is_file():
        print(f"  reusing {run_dir}", flush=True)
        return json.loads(record.read_text())
    cmd = [PY, "-m", "align", *args, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(
            [PY, "-c", RSS_WRAPPER, *cmd],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    kb = next((int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_KB")), 0)
    out = {"peak_rss_mb": kb / 1024, "wall_s": round(time.time() - t0, 1)}
    record.write_text(json.dumps(out))
    return out


def row_of(name: str, label: str, lr: float, run_dir: Path, proc: dict) -> dict:
    manifest = json.loads((run_dir / "artifact.json").read_text())
    m = manifest["metrics"]
    steps = m.get("train/global_step") or 1
    runtime = m.get("train/train_runtime")
    return {
        "name": name,
        "label": label,
        "lr": lr,
        "trainable": manifest["adapter"].get("trainable_params"),
        "size_mb": (manifest["adapter"].get("size_bytes") or 0) / 2**20,
        "rss_mb": proc["peak_rss_mb"],
        "s_per_step": runtime / steps if runtime else None,
        "metrics": m,
        "dir": str(run_dir),
    }


COLUMNS = [
    ("instr. acc. (prompt)", "eval/ifeval/prompt_accuracy", "pct"),
    ("instr. acc. (instr.)", "eval/ifeval/instruction_accuracy", "pct"),
    ("general ppl tuned/base", "eval/forgetting/ppl_ratio", "x"),
    ("KL(base ‖ tuned)/token", "eval/forgetting/kl_base_tuned", "f"),
    ("known answers kept", "eval/forgetting/qa_retained", "pct"),
]


def _cell(v, kind: str) -> str:
    if v is None or v != v:
        return "-"
    return {"pct": f"{100 * v:.1f}%", "x": f"x{v:.3f}", "f": f"{v:.3f}"}[kind]


def render(rows: list[dict], opts) -> str:
    what = (
        "SMOKE RUN (data=tiny, 2 steps, 2 eval prompts): proves the script, not a result"
        if opts.smoke
        else f"{opts.steps} SFT steps x {opts.batch_size} rows of reward_data/sft_train.jsonl per method"
    )
    lines = [
        f"Fine-tuning methods on the embedded SmolLM2-135M ({what}; held-out: strict judges on "
        f"{opts.eval_prompts} prompts of reward_data/prompts_test.jsonl; forgetting on reward_data/general_*.jsonl)",
        "",
        "| method | lr | trainable params | adapter on disk | peak RSS | s/step | "
        + " | ".join(c for c, _, _ in COLUMNS)
        + " | verdict |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(COLUMNS) + "---|",
    ]
    base = next((r["metrics"] for r in rows if r["name"] != "qlora"), {})  # qlora's base is 4-bit
    if "eval/base/ifeval/prompt_accuracy" in base:
        cells = ["base model (no training)", "-", "-", "-", "-", "-"]
        cells += [
            _cell(base.get(key.replace("eval/", "eval/base/", 1)), kind) for _, key, kind in COLUMNS[:2]
        ]
        cells += ["x1 (by definition)", "0", "100%", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        m = r["metrics"]
        cells = [
            r["label"],
            f"{r['lr']:g}",
            f"{r['trainable']:,}" if r["trainable"] is not None else "-",
            f"{r['size_mb']:.2f} MB",
            f"{r['rss_mb']:.0f} MB",
            f"{r['s_per_step']:.2f}" if r["s_per_step"] else "-",
            *[_cell(m.get(key), kind) for _, key, kind in COLUMNS],
            "forgetting" if m.get("eval/forgetting/flag") else "ok",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=72, help="train.max_steps of every method")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--smoke", action="store_true", help="data=tiny, 2 steps, 2 eval prompts")
    ap.add_argument(
        "--only", nargs="*", default=None, help=f"method names: {' '.join(n for n, *_ in METHODS)}"
    )
    ap.add_argument("--no-replay", action="store_true", help="skip the replay row")
    ap.add_argument("--replay-fraction", type=float, default=0.2)
    ap.add_argument("--lr", nargs="*", default=[], help="per-method lr, e.g. prompt=1e-1 full=1e-5")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "overrides", nargs="*", help="extra overrides for every command (e.g. model=qwen2.5-0.5b)"
    )
    opts = ap.parse_args()
    if opts.smoke:
        opts.steps, opts.eval_prompts = 2, 2
    lrs = {k: float(v) for k, v in (x.split("=", 1) for x in opts.lr)}
    out = (opts.out or REPO / "outputs" / "methods" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    common = [
        "stage=sft",
        "tracking=disabled" if opts.smoke else "tracking=offline",
        f"train.max_steps={opts.steps}",
        f"train.batch_size={opts.batch_size}",
        "train.eval_at_end=true",
        f"eval.max_prompts={opts.eval_prompts}",
        *opts.overrides,
    ]
    if opts.smoke:
        common += [
            "data=tiny",
            "eval.max_pairs=2",
            "eval.max_new_tokens=8",
            "eval.max_general=4",
            "eval.general_new_tokens=8",
        ]
    rows = []
    for name, label, extra, lr in METHODS:
        if opts.only and name not in opts.only:
            continue
        lr = lrs.get(name, lr)
        run_dir = out / name
        proc = run_align([*common, *extra, f"train.lr={lr}"], run_dir, log)
        rows.append(row_of(name, label, lr, run_dir, proc))
    if rows and not opts.no_replay:
        # the method that forgot most (general-text perplexity ratio), again with replay
        worst = max(rows, key=lambda r: r["metrics"].get("eval/forgetting/ppl_ratio") or 0.0)
        name, label, extra, _ = next(x for x in METHODS if x[0] == worst["name"])
        run_dir = out / f"{name}-replay"
        replay = [f"data.replay={REPLAY_FILE}", f"data.replay_fraction={opts.replay_fraction}"]
        proc = run_align([*common, *extra, f"train.lr={worst['lr']}", *replay], run_dir, log)
        rows.append(
            row_of(
                name, f"{label} + replay {opts.replay_fraction:.0%} general rows", worst["lr"], run_dir, proc
            )
        )
    table = render(rows, opts)
    (out / "methods.md").write_text(table)
    print("\n" + table)
    print(f"(written to {out / 'methods.md'}; commands and logs in {log})")


if __name__ == "__main__":
    main()
