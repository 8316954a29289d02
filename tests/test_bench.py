"""The bench scripts' own arithmetic, on the tiny model (their real runs are in README/docs)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
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


def test_results_table_compares_each_method_with_its_sft_start_prompt_by_prompt():
    """examples/results_table.py: the difference to the SFT start is paired (same prompts) and
    is bold only when it is larger than its 95% band."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", REPO / "examples" / "results_table.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)

    n = 200
    sft = {"passed": [1.0] * 50 + [0.0] * 150}
    better = {"passed": [1.0] * 50 + [1.0] * 30 + [0.0] * 120}  # +30 prompts, nothing lost
    swapped = {"passed": [0.0] * 5 + [1.0] * 45 + [1.0] * 8 + [0.0] * 142}  # lost 5, won 8
    delta, band = rt.versus(better, sft)
    assert delta == 15.0 and 0 < band < 15.0
    # by hand: d_i is 1 on 30 prompts and 0 elsewhere
    mean = 30 / n
    sd = (((1 - mean) ** 2 * 30 + mean**2 * (n - 30)) / (n - 1)) ** 0.5
    assert band == pytest.approx(100 * 1.96 * sd / n**0.5)
    assert rt.show_delta((delta, band)) == f"**+15.0 ± {band:.1f}**"
    d2 = rt.versus(swapped, sft)
    assert d2[0] == 1.5 and not rt.show_delta(d2).startswith("**")
    assert rt.versus(sft, sft) is None and rt.versus(better, None) is None
