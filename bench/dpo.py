"""DPO throughput and peak memory: align's dpo stage vs the plain TRL script a user would write.

    python bench/dpo.py [--steps 12] [--batch-size 4] [--eval-rows 16] [--reps 2]

Same model (embedded SmolLM2-135M), rows, LoRA config, batch size, max length, learning rate,
beta and steps, and the same precision: fp32 (align pinned to ``train.autocast=none``, since
``auto`` turns bf16 autocast on where the CPU computes bf16 natively). Each side runs as its user
starts it: align as ``python -m align stage=dpo`` (so on jemalloc where installed, its default),
the TRL script as plain ``python`` (glibc's malloc; a jemalloc in this shell's LD_PRELOAD is taken
out). Everything else is each side's defaults: TRL's (gradient checkpointing on, reference
forward every step) and align's (length-grouped batches, reference log-probs computed once and
cached on disk under ``$ALIGN_CACHE``).

Per repetition, each in a fresh process: plain TRL; align **cold** (``ALIGN_CACHE`` a fresh
directory holding only the converted model, so tokenization and the reference pass run as on a
first run); align **warm** (the cache the first cold run filled: a rerun or a sweep job); and,
on a CPU with native bf16 (align.hardware), align warm with ``train.autocast=bf16``.

pairs/s = training pairs / seconds from building the trainer to the end of training
(tokenization, reference pass and optimisation; model loading and evaluation excluded).
Peak RSS: the process's maximum resident set (GNU time), the largest over the repetitions.
Lines at the end: ``dpo_rss_ratio: <align peak RSS / plain TRL peak RSS>`` (align's worst fp32
run, cold or warm), ``dpo_speedup_cold:``, ``bf16_speedup: <align bf16 / align fp32, warm>`` (or
why it is skipped), and last ``dpo_speedup: <align warm median pairs/s / plain TRL median>``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import PY, REPO, median, plain_env, print_table, run_measured


def align_cmd(steps: int, batch: int, eval_rows: int, out: Path, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "align",
        "stage=dpo",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"data.max_eval_rows={eval_rows}",
        "tracking=disabled",
        f"hydra.run.dir={out}",
        *extra,
    ]


def run_align(args, out: Path, cache: Path, autocast: str) -> dict:
    r = run_measured(
        align_cmd(args.steps, args.batch_size, args.eval_rows, out, f"train.autocast={autocast}"),
        env=plain_env(ALIGN_CACHE=str(cache)),
        clear=True,
    )
    if r["rc"] != 0:
        raise SystemExit(f"align run failed:\n{r['stderr'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    alloc = json.loads((out / "artifact.json").read_text())["hardware"]["allocator"]["name"]
    return {
        "train_s": m["time/train_s"],
        "eval_acc": m["eval/rewards/accuracies"],
        "rss": r["peak_rss_mib"],
        "allocator": alloc,
    }


def run_plain(args, out: Path) -> dict:
    r = run_measured(
        [
            PY,
            str(Path(__file__).parent / "_plain_trl_dpo.py"),
            f"--steps={args.steps}",
            f"--batch-size={args.batch_size}",
            f"--eval-rows={args.eval_rows}",
            f"--out={out}",
        ],
        env=plain_env(),
        clear=True,
    )
    if r["rc"] != 0:
        raise SystemExit(f"plain TRL run failed:\n{r['stderr'][-3000:]}")
    res = json.loads(re.search(r"BENCH_RESULT (.*)", r["stdout"]).group(1))
    return {
        "train_s": res["train_s"],
        "eval_acc": res["eval_acc"],
        "rss": r["peak_rss_mib"],
        "allocator": "glibc",
    }


def model_cache() -> Path:
    """The converted embedded model in the user's align cache (converting it first if needed)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/bench');"
        "from _common import compose; from align import backbone;"
        "print(backbone.resolve_model_path(compose(['stage=dpo']).model))"
    )
    path = subprocess.run([PY, "-c", code, str(REPO)], check=True, capture_output=True, text=True)
    return Path(path.stdout.strip().splitlines()[-1])


def native_bf16() -> bool:
    code = "from align.hardware import cpu_computes_bf16; print(int(cpu_computes_bf16()))"
    r = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip().endswith("1")


def fresh_cache(root: Path, model_dir: Path) -> Path:
    """An ALIGN_CACHE that holds only the converted model (no tokenized data, no log-probs)."""
    (root / "models").mkdir(parents=True)
    (root / "models" / model_dir.name).symlink_to(model_dir)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast runs")
    args = ap.parse_args()
    pairs = args.steps * args.batch_size
    model_dir = model_cache()
    bf16 = native_bf16() and not args.no_bf16
    runners = ["plain TRL", "align cold", "align warm"] + (["align warm bf16"] if bf16 else [])
    results: dict[str, list[dict]] = {k: [] for k in runners}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        tmp = Path(tmp)
        warm_cache = None
        for i in range(args.reps):
            for name in runners:
                out = tmp / f"{name.replace(' ', '_')}-{i}"
                if name == "plain TRL":
                    res = run_plain(args, out)
                elif name == "align cold":
                    cache = fresh_cache(tmp / f"cache-{i}", model_dir)
                    res = run_align(args, out, cache, "none")
                    warm_cache = warm_cache or cache  # later runs reuse what this one computed
                else:
                    res = run_align(args, out, warm_cache, "bf16" if "bf16" in name else "none")
                res["pairs_s"] = pairs / res["train_s"]
                results[name].append(res)
                print(
                    f"  rep {i} {name}: {res['pairs_s']:.3f} pairs/s, peak RSS {res['rss']:.0f} MiB "
                    f"({res['allocator']}), held-out acc {res['eval_acc']:.3f}",
                    flush=True,
                )
    rows = [
        {
            "runner": name,
            "allocator": rs[0]["allocator"],
            "pairs/s (median)": f"{median([r['pairs_s'] for r in rs]):.3f}",
            "pairs/s (each)": " ".join(f"{r['pairs_s']:.3f}" for r in rs),
            "peak RSS MiB (max)": f"{max(r['rss'] for r in rs):.0f}",
            "held-out acc": " ".join(f"{r['eval_acc']:.3f}" for r in rs),
        }
        for name, rs in results.items()
    ]
    print_table(rows, list(rows[0]))

    def speed(name: str) -> float:
        return median([r["pairs_s"] for r in results[name]])

    plain_rss = max(r["rss"] for r in results["plain TRL"])
    align_rss = max(r["rss"] for r in results["align cold"] + results["align warm"])
    print(f"dpo_rss_ratio: {align_rss / plain_rss:.3f}")
    print(f"dpo_speedup_cold: {speed('align cold') / speed('plain TRL'):.2f}")
    if bf16:
        print(f"bf16_speedup: {speed('align warm bf16') / speed('align warm'):.2f}")
    else:
        why = "--no-bf16" if args.no_bf16 else "this CPU has no native bf16 (AVX512-BF16/AMX)"
        print(f"bf16_speedup skipped: {why}")
    print(f"dpo_speedup: {speed('align warm') / speed('plain TRL'):.2f}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
