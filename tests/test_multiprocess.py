"""`accelerate launch` with 2 processes on CPU (torchrun + gloo): one run directory for
all ranks, artifacts and W&B from rank 0 only, and a result that loads like any other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

ACCELERATE = Path(sys.executable).with_name("accelerate")
needs_accelerate = pytest.mark.skipif(
    not ACCELERATE.exists() and not shutil.which("accelerate"), reason="accelerate CLI missing"
)


def launch_two_processes(stage: str, args: list[str], root: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` (conf/accelerate/cpu.yaml: 2 processes) of ``python -m align``,
    with run directories under ``root`` and W&B quiet."""
    env = dict(os.environ, ALIGN_OUTPUT_ROOT=str(root), WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    cmd = [
        str(ACCELERATE if ACCELERATE.exists() else shutil.which("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "conf" / "accelerate" / "cpu.yaml"),
        "-m",
        "align",
        f"stage={stage}",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_accelerate
def test_two_process_dpo_shares_one_run_dir_and_loads_like_a_single_process_result(tiny_model, tmp_path):
    root = tmp_path / "outputs"
    args = [
        a for a in tiny_overrides(tiny_model, "data=tiny", "train.max_steps=3") if a != "tracking=disabled"
    ]
    r = launch_two_processes("dpo", [*args, "tracking=offline"], root)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("align: stage=dpo finished") == 1  # rank 0 prints the summary

    (run_dir,) = (root / "dpo").iterdir()  # ONE directory for both ranks
    manifest = json.loads((run_dir / "artifact.json").read_text())
    assert manifest["stage"] == "dpo"
    # both ranks trained: 3 steps x 4 pairs per rank x 2 ranks
    assert manifest["data"]["train_rows"] == 24 and manifest["metrics"]["train/global_step"] == 3
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run, from rank 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()


@needs_accelerate
def test_two_process_ppo_rolls_out_on_both_ranks_and_keeps_them_in_sync(tiny_model, tmp_path):
    """Each rank rolls out its share of prompts, gradients are averaged across ranks, the stage
    checks that every rank ends with the same weights, and rank 0 alone writes the run."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Tell me about rain {i}. Use lowercase only."}],
            "constraints": [{"type": "lowercase"}],
        }
        for i in range(16)
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    root = tmp_path / "outputs"
    args = tiny_overrides(
        tiny_model,
        "ppo.reward=judge:ifeval",
        "ppo.max_new_tokens=12",
        "ppo.missing_eos_penalty=null",
        "ppo.temperature=1.0",
        f"data.train={prompts}",
        f"data.eval={prompts}",
        "data.max_eval_rows=4",
        "train.max_steps=2",
        "train.lr=1e-2",
        "train.batch_size=4",
        "ppo.num_mini_batches=1",
    )
    r = launch_two_processes("ppo", args, root)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("align: stage=ppo finished") == 1
    (run_dir,) = (root / "ppo").iterdir()
    history = json.loads((run_dir / "log_history.json").read_text())
    assert len(history) == 2
    # 2 steps x (batch_size 4 prompts) x 2 ranks
    assert history[-1]["train/episodes"] == 16
    assert all(abs(h["objective/kl"]) < 10 for h in history)
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_leave_process_group_tears_the_group_down_after_a_barrier(tmp_path):
    """A rank that exits with its gloo group still up can abort in the interpreter's
    finalisation (SIGABRT after a successful run, seen in CI): the entry point tears it down."""
    import torch.distributed as dist

    from align import runs

    runs.leave_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        runs.leave_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_more_ranks_than_gpus_is_a_clear_error_before_any_collective(monkeypatch):
    """Two ranks on a one-GPU machine (e.g. conf/accelerate/cpu.yaml with the GPU visible):
    align says what to do instead of NCCL's "Duplicate GPU detected" from the first broadcast."""
    import torch

    from align import runs
    from align.errors import AlignError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        AlignError, match=r"2 processes on this machine but 1 visible GPU.*CUDA_VISIBLE_DEVICES="
    ):
        runs.check_ranks_fit_gpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    runs.check_ranks_fit_gpus()  # one process: nothing to check
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runs.check_ranks_fit_gpus()  # a GPU each
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    runs.check_ranks_fit_gpus()  # CPU ranks (gloo)
