"""The real command line, end to end on the tiny model: a run, its summary, and a sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, tiny_overrides
from omegaconf import OmegaConf
from test_console import bar_names


def _align(*args, cwd=REPO, wandb_silent=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if wandb_silent:
        env["WANDB_SILENT"] = "true"
    else:  # as a user's shell has it
        env.pop("WANDB_SILENT", None)
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_sft_run_prints_a_summary_with_outputs_metrics_and_wandb_sync(tiny_model, tmp_path):
    run_dir = tmp_path / "sft"
    overrides = [
        o for o in tiny_overrides(tiny_model, "data=tiny", "train.max_steps=3") if o != "tracking=disabled"
    ]
    r = _align("stage=sft", *overrides, "tracking=offline", f"hydra.run.dir={run_dir}", wandb_silent=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "align: stage=sft finished in" in out
    assert f"outputs  {run_dir}" in out
    assert "eval/loss=" in out
    assert f"wandb sync {run_dir}/wandb/offline-run-" in out
    assert f"next     python -m align stage=dpo dpo.init={run_dir}" in out
    assert json.loads((run_dir / "artifact.json").read_text())["stage"] == "sft"
    # progress was shown while training (tqdm on stderr), and TRL's data passes (tokenise,
    # drop truncated rows, for train and eval) drew one bar between them
    assert "3/3" in r.stderr
    assert "preparing data" in bar_names(r.stderr), r.stderr[-3000:]
    assert not {"Tokenizing train dataset", "Tokenizing eval dataset"} & bar_names(r.stderr)
    # and nothing from the libraries that concerns no run: bitsandbytes' `kernels` notice,
    # transformers' deprecations raised from TRL/peft code, W&B's offline URL notice
    for noise in ("kernels", "FutureWarning", "is deprecated", "URL not available", "trl.experimental"):
        assert noise not in r.stderr, (noise, r.stderr[-3000:])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chart    {run_dir / 'curves.png'}" in out


def test_multirun_sweeps_dpo_beta(tiny_model, tmp_path):
    sweep = tmp_path / "sweep"
    r = _align(
        "-m",
        "stage=dpo",
        *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=2", "data.max_eval_rows=4"),
        "dpo.beta=0.05,0.3",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    betas = []
    for job in ("0", "1"):
        manifest = json.loads((sweep / job / "artifact.json").read_text())
        assert manifest["stage"] == "dpo"
        betas.append(OmegaConf.load(sweep / job / "config.yaml").dpo.beta)
    assert betas == [0.05, 0.3]


def test_an_unquantized_run_imports_peft_but_never_bitsandbytes(tiny_model, tmp_path, monkeypatch):
    """peft imports bitsandbytes at import where it is installed (~115 MB of RSS); a CLI run with
    adapter.bits=0 keeps it out (backbone.skip_bitsandbytes). Python's import log says which
    modules the run's process imported (the env variable survives the jemalloc re-exec)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    r = _align(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=1"),
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
    }
    assert "peft" in imported and "trl" in imported
    # the halted attempt is logged as "bitsandbytes" alone; a real import loads its submodules
    assert not {m for m in imported if m.startswith("bitsandbytes.")}
