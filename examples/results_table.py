"""Results table: base, SFT, SFT->DPO, SFT->KTO, ORPO, SFT->SimPO, SFT->RM->PPO and SFT->GRPO on
the embedded SmolLM2-135M, each trained (by default at its stage's own defaults, as the bare
``python -m align stage=<name>`` runs) and then evaluated together by one ``stage=eval
eval.model=[base,<run>,...]`` on the same held-out prompts and pairs: a paired comparison.

    .venv/bin/python examples/results_table.py                       # stage defaults, 200 prompts (~1.5 h)
    .venv/bin/python examples/results_table.py --minutes 10          # ~10 min of training per stage
    .venv/bin/python examples/results_table.py --steps sft=60,dpo=40,rm=30,ppo=5,grpo=24
    .venv/bin/python examples/results_table.py --smoke               # 1-2 steps each, data=tiny

Every step shells out to ``python -m align ...`` (the same commands a user types), into
``--out`` (default ``outputs/results/<time>``), and the table is written to
``<out>/results.md`` and printed. With ``--minutes`` the number of steps is estimated from a
timed short probe run of that stage (``--probe-steps`` steps, startup subtracted by a 1-step
run); ``--steps`` fixes it. Each method's prompt-level difference to the SFT run it starts from
(and to the base) comes with the 95% band of a paired difference on that many prompts; a
difference outside it is marked as larger than the noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

# (method, chain of (stage, extra overrides with {sft}/{rm} placeholders))
METHODS = [
    ("base", []),
    ("SFT", [("sft", [])]),
    # stage=dpo's default lr from an SFT adapter is 5e-5 (5e-4, its default from the base,
    # collapsed within 40 steps: both log-probs fell ~27 nats, outputs became "<<<<...")
    ("SFT -> DPO", [("sft", []), ("dpo", ["dpo.init={sft}"])]),
    # KTO on the shipped pairs, each split into a desirable and an undesirable row
    ("SFT -> KTO", [("sft", []), ("kto", ["kto.init={sft}"])]),
    # ORPO is SFT and preference optimisation in one stage: it starts from the base
    ("ORPO (from base)", [("orpo", [])]),
    ("SFT -> SimPO", [("sft", []), ("simpo", ["simpo.init={sft}"])]),
    # the reward model starts from the SFT run, as stage=rlhf does by default (rlhf.rm_from_sft)
    (
        "SFT -> RM -> PPO",
        [("sft", []), ("rm", ["rm.init={sft}"]), ("ppo", ["ppo.policy={sft}", "ppo.reward={rm}"])],
    ),
    ("SFT -> GRPO (judge:ifeval)", [("sft", []), ("grpo", ["grpo.init={sft}", "grpo.reward=judge:ifeval"])]),
]
COLUMNS = [
    ("instruction acc. (prompt)", "eval/ifeval/prompt_accuracy", True),
    ("instruction acc. (instr.)", "eval/ifeval/instruction_accuracy", True),
    ("preference acc.", "eval/pref/accuracy", True),
    ("KL to base (per token)", "eval/kl/token", False),
    ("mean length (tokens)", "eval/length/tokens", False),
    ("mean length (words)", "eval/length/words", False),
]


def stage_exists(stage: str) -> bool:
    return (REPO / "align" / "stages" / f"{stage}.py").is_file()


def align(args: list[str], run_dir: Path, log: Path) -> float:
    """Run ``python -m align <args>`` into ``run_dir``; returns its wall time in seconds.

    A run dir that already holds a finished run (artifact.json, written last) is reused, so an
    interrupted table continues where it stopped when given the same ``--out``."""
    done = run_dir / "artifact.json"
    if done.is_file():
        wall = json.loads(done.read_text()).get("metrics", {}).get("time/wall_s")
        if wall is not None:
            print(f"  reusing {run_dir} ({wall / 60:.1f} min)", flush=True)
            return float(wall)
    cmd = [PY, "-m", "align", *args, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def steps_for(stage: str, common: list[str], opts, out: Path, log: Path) -> int | None:
    """Training steps: fixed by ``--steps``, the stage's default (None) without ``--minutes``, else
    what fits ``--minutes`` (time a 1-step and a probe run of the stage)."""
    if stage in opts.steps:
        return opts.steps[stage]
    if "*" in opts.steps:
        return opts.steps["*"]
    if opts.minutes is None:  # the stage's own default
        return None
    if stage == "sft" and "sft" in opts._cache:
        return opts._cache["sft"]
    extra = {"ppo": ["ppo.reward=judge:ifeval"]}.get(stage, [])
    one = align([f"stage={stage}", *common, *extra, "train.max_steps=1"], out / f"probe-{stage}-1", log)
    many = align(
        [f"stage={stage}", *common, *extra, f"train.max_steps={1 + opts.probe_steps}"],
        out / f"probe-{stage}-n",
        log,
    )
    per_step = max((many - one) / opts.probe_steps, 0.1)
    startup = max(one - per_step, 0.0)
    steps = max(1, int((opts.minutes * 60 - startup) / per_step))
    print(f"  {stage}: ~{per_step:.1f} s/step, startup ~{startup:.0f} s -> {steps} steps", flush=True)
    opts._cache[stage] = steps
    return steps


def parse_steps(text: str) -> dict[str, int]:
    """``60`` -> every stage 60 steps; ``sft=60,dpo=40`` -> those stages (others are probed)."""
    if "=" not in text:
        return {"*": int(text)}
    return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training budget per stage of each method (default: each stage's own train.max_steps)",
    )
    ap.add_argument(
        "--steps",
        type=parse_steps,
        default={},
        help="fix train.max_steps (skips probing): N for every stage, or per stage: sft=60,dpo=40,ppo=5",
    )
    ap.add_argument("--probe-steps", type=int, default=2)
    ap.add_argument(
        "--smoke", action="store_true", help="data=tiny, 1-2 steps, 4 eval prompts: proves the pipeline"
    )
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts every model answers")
    ap.add_argument("--pairs", type=int, default=None, help="held-out pairs (default: stage=eval's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    ap.add_argument(
        "overrides", nargs="*", help="extra overrides for every command (e.g. model=qwen2.5-0.5b)"
    )
    opts = ap.parse_args()
    opts._cache = {}
    out = (opts.out or REPO / "outputs" / "results" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    common = ["tracking=disabled" if opts.smoke else "tracking=offline", *opts.overrides]
    train_extra: dict[str, list[str]] = {}
    evaluate = [f"eval.max_prompts={opts.prompts}"]
    evaluate += [] if opts.pairs is None else [f"eval.max_pairs={opts.pairs}"]
    if opts.smoke:
        opts.steps = opts.steps or {"*": 2}
        evaluate = ["eval.max_prompts=4", "eval.max_pairs=8", "eval.max_new_tokens=16"]
        train_extra = {
            "sft": ["data=tiny"],
            "dpo": ["data=tiny"],
            "kto": ["data=tiny"],
            "orpo": ["data=tiny"],
            "simpo": ["data=tiny"],
            "rm": ["data=tiny"],
            "ppo": ["data.max_train_rows=16", "data.max_eval_rows=2", "ppo.max_new_tokens=16"],
            "grpo": ["data.max_train_rows=16", "grpo.max_completion_length=16"],
        }
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rows = []
    done: dict[tuple, Path] = {}  # shared prefixes (the SFT run) are trained once
    took: dict[tuple, float] = {}  # ... and their wall time counts for every method built on them
    for name, chain in METHODS:
        if opts.only and name not in opts.only:
            continue
        missing = [s for s, _ in chain if not stage_exists(s)]
        if missing:
            rows.append({"method": name, "todo": f"TODO: stage={','.join(missing)} is not in this tree yet"})
            continue
        wall = 0.0
        dirs: dict[str, Path] = {}
        prefix: tuple = ()
        for stage, extra in chain:
            prefix = (*prefix, stage)
            if prefix in done:
                dirs[stage] = done[prefix]
                wall += took[prefix]
                continue
            steps = steps_for(stage, common + train_extra.get(stage, []), opts, out, log)
            run_dir = out / "-".join(prefix)
            args = [f"stage={stage}", *common, *train_extra.get(stage, [])]
            args += [] if steps is None else [f"train.max_steps={steps}"]
            args += [x.format(**{k: str(v) for k, v in dirs.items()}) for x in extra]
            took[prefix] = align(args, run_dir, log)
            wall += took[prefix]
            dirs[stage] = done[prefix] = run_dir
        rows.append(
            {
                "method": name,
                "spec": str(dirs[chain[-1][0]]) if chain else "base",
                "from": str(dirs["sft"]) if "sft" in dirs else None,  # the SFT row: itself, no delta
                "train_s": wall,
            }
        )

    # one stage=eval for every model: the same prompts and pairs, outcome by outcome
    specs = [r["spec"] for r in rows if "spec" in r]
    if specs:
        # named by the models it holds: a finished eval is reused only for the same list (a later
        # --only with the same --out gets its own)
        eval_dir = out / f"eval-{hashlib.sha1(','.join(specs).encode()).hexdigest()[:8]}"
        eval_args = [
            "stage=eval",
            *common,
            f"eval.model=[{','.join(specs)}]",
            "eval.baseline=none",
            *evaluate,
        ]
        align(eval_args, eval_dir, log)
        report = json.loads((eval_dir / "eval.json").read_text())
        by_spec = {m["spec"]: m for m in report["models"]}
        for r in rows:
            if "spec" in r:
                r["eval"] = by_spec[r["spec"]]
                r["vs_sft"] = versus(r["eval"], by_spec.get(r["from"]))
                r["vs_base"] = versus(r["eval"], by_spec.get("base"))  # None for the base row itself

    table = render(rows, opts)
    (out / "results.md").write_text(table)
    print("\n" + table)
    print(f"(written to {out / 'results.md'})")


def versus(row: dict, start: dict | None) -> tuple[float, float] | None:
    """Prompt-level difference of ``row`` to ``start`` (points) and the half-width of its paired
    95% band (``align.evaluation.paired_band``: the same prompts, outcome by outcome)."""
    if start is None or start is row or not row.get("passed") or not start.get("passed"):
        return None
    from align.evaluation import paired_band

    a, b = row["passed"], start["passed"]
    return 100 * (sum(a) - sum(b)) / len(a), 100 * paired_band(a, b)


def show_delta(d: tuple[float, float] | None) -> str:
    """``+9.5 ± 6.1`` in bold when the difference is larger than its band (not noise)."""
    if d is None:
        return "-"
    delta, band = d
    text = f"{delta:+.1f} ± {band:.1f}"
    return f"**{text}**" if abs(delta) > band else text


def budget(opts) -> str:
    if "*" in opts.steps:  # parse_steps gives either {"*": N} or named stages, never both
        return f"{opts.steps['*']} training steps per stage"
    fixed = ", ".join(f"{k}={v}" for k, v in opts.steps.items())
    if fixed:
        chosen = [chain for name, chain in METHODS if not opts.only or name in opts.only]
        probed = {s for chain in chosen for s, _ in chain} - set(opts.steps)
        rest = (
            ""
            if not probed
            else f" (others at {'their defaults' if opts.minutes is None else f'{opts.minutes:g} min'})"
        )
        return f"training steps per stage: {fixed}{rest}"
    if opts.minutes is None:
        return "each stage at its own defaults"
    return f"{opts.minutes:g} min training budget per stage"


def render(rows: list[dict], opts) -> str:
    extra = ["prompt-level vs its SFT start (pts, paired 95%)", "vs base", "train wall time", "eval time"]
    head = "| method | " + " | ".join([c for c, _, _ in COLUMNS] + extra) + " |"
    n = next((len(r["eval"]["passed"]) for r in rows if r.get("eval", {}).get("passed")), 0)
    lines = [
        f"Held-out results ({'SMOKE RUN: data=tiny, 2 steps, 4 prompts; not a result' if opts.smoke else ''}"
        f"{'' if opts.smoke else budget(opts)}; "
        f"strict judges on {n} prompts of reward_data/prompts_test.jsonl, preference accuracy on "
        "pairs_test.jsonl; every model on the same prompts)",
        "",
        head,
        "|" + "---|" * (len(COLUMNS) + len(extra) + 1),
    ]
    for r in rows:
        if "todo" in r:
            lines.append(
                f"| {r['method']} ({r['todo']}) | " + " | ".join(["-"] * (len(COLUMNS) + len(extra))) + " |"
            )
            continue
        m = r["eval"]["metrics"]
        cells = []
        for _, key, pct in COLUMNS:
            v = m.get(key.removeprefix("eval/"))
            cells.append("-" if v is None or v != v else (f"{100 * v:.1f}%" if pct else f"{v:.3f}"))
        cells += [show_delta(r["vs_sft"]), show_delta(r["vs_base"])]
        cells += [
            f"{r['train_s'] / 60:.1f} min" if r["train_s"] else "-",
            f"{r['eval']['time_s'] / 60:.1f} min",
        ]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"A difference in **bold** is larger than its 95% band: 1.96 x sd(a_i - b_i) / sqrt(n) over the "
        f"{n} prompts, outcome by outcome (one prompt is {100 / max(n, 1):.1f} points). Train wall time "
        "includes the runs a method starts from.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
