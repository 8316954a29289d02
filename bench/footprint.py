"""Peak memory and step time of every training stage, with glibc's malloc and with jemalloc.

    python bench/footprint.py [--stages sft,dpo,rm,grpo,ppo] [--steps sft=4,dpo=4,...] [key=value ...]

Runs each stage at its defaults (embedded SmolLM2-135M, LoRA, the shipped data; only
``train.max_steps`` is lowered so the whole bench takes minutes) as a user runs it, ``python -m
align stage=<name>``, in a fresh process, once with ``ALIGN_MALLOC=system`` (glibc) and once with
``ALIGN_MALLOC=jemalloc`` (align's default where the library is installed), alternating. Peak RSS
is the process's maximum resident set (GNU time); s/step is the training loop's time divided by
its steps (TRL's ``train_runtime``; PPO: the mean ``time/step_s``), the first step included.
``stage=ppo`` uses ``ppo.reward=judge:ifeval`` (no reward model needed). Held-out evaluation runs
as in a normal run (its peak counts). ``stage=dpo``'s checkpointing follows the allocator as a
user's run does (``train.checkpoint_every=0``: every 2nd layer on jemalloc, every layer on glibc);
pass ``train.checkpoint_every=1`` to compare like for like. Extra ``key=value`` overrides go to
every stage.

Last line: ``footprint_jemalloc_rss_ratio: <sum of jemalloc peaks / sum of glibc peaks>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _common import PY, plain_env, print_table, run_measured

STAGES = ("sft", "dpo", "rm", "grpo", "ppo")
# few enough that sft+dpo+rm+grpo+ppo under both allocators stays near 10 minutes on 2 cores
DEFAULT_STEPS = {"sft": 4, "dpo": 4, "rm": 4, "grpo": 2, "ppo": 2}
EXTRA = {"ppo": ["ppo.reward=judge:ifeval"]}


def cpu_line() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name":
                model = v.strip()
            elif k.strip() == "flags":
                flags = set(v.split())
                break
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({os.cpu_count()} CPUs; {' '.join(shown) or 'no AVX2'})"


def run_stage(stage: str, steps: int, allocator: str, out: Path, overrides: list[str]) -> dict:
    cmd = [
        PY,
        "-m",
        "align",
        f"stage={stage}",
        f"train.max_steps={steps}",
        "tracking=disabled",
        f"hydra.run.dir={out}",
        *EXTRA.get(stage, []),
        *overrides,
    ]
    r = run_measured(cmd, env=plain_env(ALIGN_MALLOC=allocator), clear=True)
    if r["rc"] != 0:
        raise SystemExit(f"stage={stage} ALIGN_MALLOC={allocator} failed:\n{r['stderr'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    alloc = json.loads((out / "artifact.json").read_text())["hardware"]["allocator"]["name"]
    if "train/train_runtime" in m and m.get("train/global_step"):
        s_step = m["train/train_runtime"] / m["train/global_step"]
    else:  # stage=ppo: align's own trainer logs each step's time
        hist = json.loads((out / "log_history.json").read_text())
        times = [h["time/step_s"] for h in hist if "time/step_s" in h]
        s_step = sum(times) / len(times) if times else float("nan")
    return {"peak_mib": r["peak_rss_mib"], "s_step": s_step, "wall_s": r["wall_s"], "allocator": alloc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", default="", help="per-stage steps, e.g. sft=4,ppo=2 (defaults: %(default)s)")
    ap.add_argument("overrides", nargs="*", help="align config overrides for every stage")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    steps = dict(DEFAULT_STEPS)
    for item in filter(None, args.steps.split(",")):
        k, _, v = item.partition("=")
        steps[k] = int(v)
    print(f"CPU: {cpu_line()}; {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    totals = {"system": 0.0, "jemalloc": 0.0}
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        for stage in stages:
            res = {}
            for allocator in ("system", "jemalloc"):
                res[allocator] = run_stage(
                    stage, steps[stage], allocator, Path(tmp) / f"{stage}-{allocator}", args.overrides
                )
                r = res[allocator]
                print(
                    f"  {stage:<5} {allocator:<8} ({r['allocator']}): peak {r['peak_mib']:.0f} MiB, "
                    f"{r['s_step']:.2f} s/step, wall {r['wall_s']:.0f} s",
                    flush=True,
                )
                totals[allocator] += r["peak_mib"]
            g, j = res["system"], res["jemalloc"]
            rows.append(
                {
                    "stage": stage,
                    "steps": steps[stage],
                    "peak RSS glibc MiB": f"{g['peak_mib']:.0f}",
                    "peak RSS jemalloc MiB": f"{j['peak_mib']:.0f}",
                    "jemalloc/glibc RSS": f"{j['peak_mib'] / g['peak_mib']:.2f}",
                    "s/step glibc": f"{g['s_step']:.2f}",
                    "s/step jemalloc": f"{j['s_step']:.2f}",
                    "jemalloc/glibc time": f"{j['s_step'] / g['s_step']:.2f}",
                }
            )
    print()
    print_table(rows, list(rows[0]))
    print(f"footprint_jemalloc_rss_ratio: {totals['jemalloc'] / totals['system']:.3f}")


if __name__ == "__main__":
    main()
