"""PPO memory: one shared base with named adapters vs four model copies (TRL's layout).

    python bench/ppo_memory.py [--steps 3] [key=value ...]        # e.g. adapter=qlora

Runs the same PPO steps on the embedded SmolLM2-135M (policy, reference, value, reward) twice,
each in a fresh subprocess: ``ppo.separate_models=false`` (ours) and ``=true`` (a base copy per
role). The reward is a stage=rm-shaped adapter with random weights (saved once to a temp dir),
so no reward model has to be trained first. For each run: RSS after imports (before any model
is loaded), peak RSS, their difference (net peak) and seconds per PPO step (the first step is
a warm-up and not timed). Each run is on the allocator ``python -m align`` would use (jemalloc
where installed; ``ALIGN_MALLOC=system`` for glibc's malloc). The last line is
``ppo_memory_ratio: <shared net / separate net>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, compose


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_reward_adapter(overrides: list[str], out: Path) -> None:
    """A LoRA (task SEQ_CLS) + score head with random weights, saved as stage=rm saves one."""
    import torch
    from peft import get_peft_model

    from align import backbone

    cfg = compose(["stage=rm", *overrides])
    rt = backbone.detect_runtime(cfg)
    path = backbone.resolve_model_path(cfg.model)
    model = get_peft_model(
        backbone.load_base_model(path, cfg, rt, task="seq_cls"), backbone.peft_config(cfg, "seq_cls")
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)


def child(args: argparse.Namespace) -> None:
    import torch

    from align import backbone, data, malloc
    from align.rl import ppo

    after_imports = rss_mb()
    torch.manual_seed(0)
    cfg = compose(
        [
            "stage=ppo",
            f"ppo.reward={args.reward}",
            f"ppo.separate_models={args.separate}",
            f"train.max_steps={args.steps}",
            "tracking=disabled",
            *args.overrides,
        ]
    )
    backbone.skip_bitsandbytes(cfg)  # as `python -m align` does for an unquantized base
    rt = backbone.detect_runtime(cfg)
    path = backbone.resolve_model_path(cfg.model)
    tokenizer = backbone.load_tokenizer(path, cfg.model)
    models = ppo.build_models(cfg, path, rt, reward_dir=args.reward)
    rows = data.load(cfg.data, "prompt", seed=0, needed_train_rows=64, as_dataset=False).train  # as stage=ppo
    trainer = ppo.PPOTrainer(cfg, models, tokenizer, rt.device, autocast_dtype=rt.autocast_dtype)
    history = trainer.train(rows, seed=0)
    timed = history[1:] or history
    print(
        "RESULT "
        + json.dumps(
            {
                "after_imports_mb": after_imports,
                "peak_mb": peak_mb(),
                "s_per_step": sum(h["time/step_s"] for h in timed) / len(timed),
                "score": history[-1]["objective/scores"],
                "completion_length": sum(h["val/completion_length"] for h in history) / len(history),
                "copies": len({id(m) for m in models.models.values()}),
                "allocator": malloc.describe()["name"],
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--separate", default="false", help=argparse.SUPPRESS)
    ap.add_argument("--reward", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="align config overrides, e.g. adapter=qlora")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        from align import malloc

        malloc.ensure()  # the allocator `python -m align` runs on (jemalloc where installed; ALIGN_MALLOC)
        child(args)
        return
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        reward = Path(tmp) / "reward"
        # the reward adapter is built in its own process, so this one stays light
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; "
                "import json; from bench.ppo_memory import make_reward_adapter; from pathlib import Path; "
                "make_reward_adapter(json.loads(sys.argv[2]), Path(sys.argv[3]))",
                str(REPO),
                json.dumps(args.overrides),
                str(reward),
            ],
            check=True,
            env=env,
        )
        results = {}
        for name, separate in (("shared", "false"), ("separate", "true")):
            t0 = time.time()
            out = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    f"--separate={separate}",
                    f"--reward={reward}",
                    f"--steps={args.steps}",
                    *args.overrides,
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.exit(f"{name} run failed:\n{out.stderr[-4000:]}")
            results[name] = json.loads(line[len("RESULT ") :]) | {"wall_s": time.time() - t0}
    print(
        f"\nPPO memory, {args.steps} steps ({' '.join(args.overrides) or 'defaults'}), "
        f"allocator {results['shared']['allocator']}:"
    )
    print(
        f"{'layout':<10} {'copies':>6} {'after imports MB':>17} {'peak MB':>9} {'net peak MB':>12} {'s/step':>8}"
    )
    for name, r in results.items():
        r["net_mb"] = r["peak_mb"] - r["after_imports_mb"]
        print(
            f"{name:<10} {r['copies']:>6} {r['after_imports_mb']:>17.0f} {r['peak_mb']:>9.0f} {r['net_mb']:>12.0f}"
            f" {r['s_per_step']:>8.2f}"
        )
    s, d = results["shared"], results["separate"]
    print(f"step time shared/separate: {s['s_per_step'] / d['s_per_step']:.3f}")
    print(f"ppo_memory_ratio: {s['net_mb'] / d['net_mb']:.3f}")


if __name__ == "__main__":
    main()
