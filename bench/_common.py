"""Helpers for the bench scripts: run a command in a subprocess, measure wall time and
peak RSS, and print the table + headline line the way every bench does."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path = REPO, clear: bool = False) -> dict:
    """Run ``cmd``; return wall seconds, the child's peak RSS (MiB, by GNU time), exit code, output.
    ``env`` is added to this process's environment, or with ``clear=True`` is the whole of it."""
    marker = "BENCH_MAXRSS_KB="
    t = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", marker + "%M", *cmd],
        cwd=cwd,
        env=dict(env or {}) if clear else {**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    lines = r.stderr.rstrip().splitlines()
    rss = int(lines[-1][len(marker) :]) / 1024 if lines and lines[-1].startswith(marker) else float("nan")
    return {"wall_s": wall, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "peak_rss_mib": rss}


def plain_env(**extra: str) -> dict[str, str]:
    """This environment without a preloaded jemalloc (a plain ``python`` as a user starts it)."""
    env = {k: v for k, v in os.environ.items() if k != "_ALIGN_MALLOC_REEXEC"}
    keep = [e for e in env.pop("LD_PRELOAD", "").replace(":", " ").split() if "jemalloc" not in e]
    if keep:
        env["LD_PRELOAD"] = " ".join(keep)
    return env | extra


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns))


def compose(overrides: list[str]):
    """The align config for ``overrides``, composed in-process as ``python -m align`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from align.__main__ import config_dir
    from align.config import register

    register()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def random_lora_model(cfg):
    """(runtime, tokenizer, model): the configured base with a LoRA adapter whose B matrices are
    random (a trained-looking adapter, active), in eval mode: what the generation benches sample from."""
    import torch
    from peft import get_peft_model

    from align import backbone

    rt = backbone.detect_runtime(cfg)
    path = backbone.resolve_model_path(cfg.model)
    tok = backbone.load_tokenizer(path, cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(backbone.load_base_model(path, cfg, rt), backbone.peft_config(cfg))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0.0, 0.02)
    model.eval()
    return rt, tok, model
