"""The bench scripts' own arithmetic, on the tiny model (their real runs are in README/docs)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_flops_bench_counts_a_training_step_and_reports_a_utilisation_below_one(tiny_model):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "flops.py"),
            "--batch-size=2",
            "--seq-len=64",
            "--steps=2",
            "--matmul-n=512",
            f"model.name_or_path={tiny_model}",
            "model.name=tiny-llama",
            "model.lora_target_modules=[all-linear]",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    counted = int(re.search(r"^flops_per_step: (\d+)$", out.stdout, re.M).group(1))
    # forward: 2 FLOPs per weight of every linear layer per token; backward through the frozen
    # base about as much again (input gradients; no weight gradients), plus attention and LoRA
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o; k, v (2 KV heads); gate, up, down
    linear = 2 * per_layer + 64 * 512  # two layers + the LM head
    tokens = 2 * 64
    assert 3.5 * linear * tokens < counted < 7 * linear * tokens
    assert lines[-1].startswith("mfu: ")
    assert 0.0 < float(lines[-1].split()[1]) <= 1.0
