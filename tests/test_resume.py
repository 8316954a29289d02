"""Interruption and resume: a run stopped by SIGTERM and resumed ends exactly where an
uninterrupted run of the same seed ends; non-finite steps stop (or are skipped) loudly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from align import guard, runs
from align.errors import AlignError
from align.stages import execute

ATOL = 1e-5
STEPS = 6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-data")
    topics = ["water", "bees", "music", "snow", "rain", "stars", "river", "forest", "ocean", "city"]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Tell me about {t} {i}."}],
            "chosen": [{"role": "assistant", "content": f"good answer about {t} yes"}],
            "rejected": [{"role": "assistant", "content": f"bad answer about {t} no"}],
        }
        for i, t in enumerate(topics * 3)
    ]
    return write_jsonl(d / "pairs.jsonl", rows)


def _cfg(tiny_model, pairs, *extra):
    return compose(
        "stage=dpo",
        *tiny_overrides(
            tiny_model,
            f"data.train={pairs}",
            f"train.max_steps={STEPS}",
            "train.batch_size=2",
            "train.lr=5e-3",
            "data.max_eval_rows=4",
            *extra,
        ),
    )


def _comparable(metrics):
    return {
        k: v
        for k, v in metrics.items()
        if not k.startswith("time/") and "runtime" not in k and "per_second" not in k
    }


def _signal_at(monkeypatch, step, signum=signal.SIGTERM):
    """Send a real signal to this process at the end of optimizer step ``step``."""
    original = guard.Guard.on_step_end

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == step and self.signum is None:
            os.kill(os.getpid(), signum)
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(guard.Guard, "on_step_end", on_step_end)


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_model, pairs, tmp_path, monkeypatch):
    full = execute(_cfg(tiny_model, pairs, "train.save_steps=0"), tmp_path / "full")

    run_dir = tmp_path / "interrupted"
    _signal_at(monkeypatch, 3)
    with pytest.raises(runs.Interrupted) as e:
        execute(_cfg(tiny_model, pairs, "train.save_steps=0"), run_dir)
    assert e.value.signum == signal.SIGTERM
    assert "at step 3" in str(e.value) and f"resume={run_dir}" in str(e.value)
    assert runs.last_checkpoint(run_dir).name == "checkpoint-3"
    assert not (run_dir / "artifact.json").exists()
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (run_dir / "checkpoints" / "checkpoint-3" / f).is_file(), f
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again
    monkeypatch.undo()

    cfg = runs.resume_config(_cfg(tiny_model, pairs, f"resume={run_dir}"), explicit=[f"resume={run_dir}"])
    resumed = execute(cfg, run_dir)

    assert resumed["train/global_step"] == STEPS
    a, b = _comparable(full), _comparable(resumed)
    assert a.keys() == b.keys()
    bad = {k: (a[k], b[k]) for k in a if b[k] != pytest.approx(a[k], abs=ATOL)}
    assert not bad
    wa = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(
        f"max |adapter weight difference| after resume: {diff:.3e}; final loss {a['train/loss']:.6f} vs {b['train/loss']:.6f}"
    )
    assert diff <= ATOL
    assert json.loads((run_dir / "artifact.json").read_text())["stage"] == "dpo"


def test_resume_refuses_overrides_that_change_the_run(tiny_model, pairs, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    _signal_at(monkeypatch, 1)
    with pytest.raises(runs.Interrupted):
        execute(_cfg(tiny_model, pairs, "train.max_steps=2"), run_dir)
    monkeypatch.undo()
    cfg = _cfg(
        tiny_model, pairs, "train.max_steps=2", f"resume={run_dir}", "train.lr=1e-1", "train.save_steps=7"
    )
    with pytest.raises(AlignError, match=r"train\.lr=0\.1 \(the run has 0\.005\)"):
        runs.resume_config(cfg, explicit=[f"resume={run_dir}", "train.lr=1e-1", "train.save_steps=7"])
    cfg = _cfg(tiny_model, pairs, "train.max_steps=2", f"resume={run_dir}", "train.save_steps=7")
    resumed = runs.resume_config(cfg, explicit=[f"resume={run_dir}", "train.save_steps=7"])
    assert resumed.train.save_steps == 7 and resumed.resume == str(run_dir)


def _poison_grads_at(monkeypatch, step):
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self, model, inputs, *a, **kw):
        loss = original(self, model, inputs, *a, **kw)
        if self.state.global_step + 1 == step:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_non_finite_gradient_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model, pairs, tmp_path, monkeypatch
):
    _poison_grads_at(monkeypatch, 3)
    run_dir = tmp_path / "nan"
    with pytest.raises(AlignError) as e:
        execute(_cfg(tiny_model, pairs, "train.save_steps=2"), run_dir)
    msg = str(e.value)
    assert "non-finite loss or gradient (NaN/inf) at step 3" in msg
    assert "checkpoint-2" in msg and "train.on_nan=skip" in msg
    assert [p.name for p in runs.checkpoints(run_dir)] == ["checkpoint-2"]
    weights = load_file(run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_gradient_skipped_with_on_nan_skip(tiny_model, pairs, tmp_path, monkeypatch):
    _poison_grads_at(monkeypatch, 2)
    m = execute(_cfg(tiny_model, pairs, "train.on_nan=skip", "train.max_steps=3"), tmp_path / "skip")
    assert m["train/skipped_nonfinite_steps"] == 1 and m["train/global_step"] == 3
    weights = load_file(tmp_path / "skip" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_cli_sigterm_saves_and_resume_auto_continues_the_same_wandb_run(tiny_model, pairs, tmp_path):
    """The real thing: SIGTERM to `python -m align`, then `resume=auto` in the same directory."""
    env = dict(os.environ, ALIGN_OUTPUT_ROOT=str(tmp_path / "outputs"), WANDB_SILENT="true")
    args = [
        "stage=sft",
        *tiny_overrides(
            # 40 steps: long enough that the run is still training when SIGTERM arrives after
            # checkpoint-2 appears, even on a loaded machine (12 finished first on a busy CPU)
            tiny_model,
            "data=tiny",
            "train.max_steps=40",
            "train.save_steps=2",
            "train.batch_size=2",
        ),
        "tracking=offline",
    ]
    args = [a for a in args if a != "tracking=disabled"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "outputs").glob("sft/*/checkpoints/checkpoint-2")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "align: got SIGTERM; saving a checkpoint" in out
    assert (
        "align: interrupted by SIGTERM at step" in err
        and "resume with: python -m align stage=sft resume=" in err
    )
    assert "Traceback" not in err
    (run_dir,) = (tmp_path / "outputs" / "sft").iterdir()
    stopped_at = runs.last_checkpoint(run_dir).name

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "align",
            *[a for a in args if "save_steps" not in a],
            "train.save_steps=100",  # a key a resumed run may change (fewer checkpoint writes)
            "resume=auto",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # train.max_steps=40 is what the run has (accepted); save_steps is one of the keys that may change
    assert "align: resume: applying train.save_steps=100" in r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {run_dir.resolve()} from {stopped_at}" in r.stdout
    assert [d.name for d in (tmp_path / "outputs" / "sft").iterdir()] == [run_dir.name]  # no new run dir
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 40
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_ppo_sigterm_then_resume_equals_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    """align's own PPO loop: policy + value adapters, value head, optimizer, scheduler, KL
    controller, RNG and prompt position survive an interruption."""
    from align.rl import ppo

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": f"Tell me about rain {i}. Answer in lowercase."}],
                "constraints": [{"type": "lowercase"}],
            }
            for i in range(16)
        ],
    )

    def cfg(*extra):
        return compose(
            "stage=ppo",
            *tiny_overrides(
                tiny_model,
                "ppo.reward=judge:ifeval",
                "ppo.max_new_tokens=8",
                "ppo.target_kl=0.01",  # an adaptive KL controller, so its state matters
                f"data.train={prompts}",
                "data.eval_fraction=0",
                "train.max_steps=4",
                "train.batch_size=2",
                "train.save_steps=0",
                *extra,
            ),
        )

    # PPO builds its fresh adapters and value head before seeding (align/rl/ppo.py), so two runs
    # in ONE process start alike only from the same global RNG state
    torch.manual_seed(0)
    full = execute(cfg(), tmp_path / "full")
    original = ppo.PPOTrainer.step_metrics
    calls = {"n": 0}

    def step_metrics(self, b):  # a real SIGTERM to this process during step 2
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, b)

    monkeypatch.setattr(ppo.PPOTrainer, "step_metrics", step_metrics)
    run_dir = tmp_path / "ppo"
    torch.manual_seed(0)
    with pytest.raises(runs.Interrupted, match="at step 2"):
        execute(cfg(), run_dir)
    monkeypatch.undo()
    assert runs.last_checkpoint(run_dir).name == "checkpoint-2"
    resumed = execute(runs.resume_config(cfg(f"resume={run_dir}"), explicit=[]), run_dir)
    a, b = _comparable(full), _comparable(resumed)
    bad = {k: (a[k], b[k]) for k in a if b.get(k) != pytest.approx(a[k], abs=ATOL)}
    assert not bad and a["objective/kl_coef"] != 0.05  # the KL coefficient moved, and resumed identically
    wa = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= ATOL
