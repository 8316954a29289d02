"""sft and dpo end to end on the tiny model: learning, chaining, artifacts, W&B."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, compose, separable_pairs, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from align import artifacts
from align.errors import AlignError
from align.stages import execute
from align.tracking import read_offline_run

TOPICS_TRAIN = ["water", "bees", "music", "snow", "rain", "stars", "river", "forest"]
TOPICS_TEST = ["ocean", "mountain", "city", "moon"]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return separable_pairs(d / "train.jsonl", TOPICS_TRAIN, 160, 0), separable_pairs(
        d / "test.jsonl", TOPICS_TEST, 24, 1
    )


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft-run")
    cfg = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=40", "train.lr=1e-2", "train.batch_size=4"),
    )
    metrics = execute(cfg, run_dir)
    return run_dir, metrics


def test_sft_loss_falls_and_artifact_is_complete(sft_run):
    run_dir, metrics = sft_run
    manifest = json.loads((run_dir / "artifact.json").read_text())
    assert manifest["stage"] == "sft" and manifest["format"] == artifacts.FORMAT
    assert manifest["base_model"]["name"] == "tiny-llama"
    assert manifest["adapter"]["path"] == "adapter" and manifest["metrics"] == metrics
    assert manifest["data"]["train"].endswith("tiny_sft.jsonl")
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])
    hw = manifest["hardware"]  # figures are only comparable with the machine that made them
    assert hw["cpu"] and isinstance(hw["cpu_flags"], list) and isinstance(hw["cpu_bf16"], bool)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
    # the loss fell, on the training rows and on held-out rows
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 40
    assert metrics["train/loss"] < metrics["train/first_loss"] - 1.0
    assert metrics["eval/loss"] < metrics["train/first_loss"] - 0.4


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_training_run_writes_curves_png(sft_run):
    """curves.png beside log_history.json: a real PNG with the loss (and SFT's token accuracy)."""
    run_dir, _ = sft_run
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000, len(png)
    assert (run_dir / "log_history.json").is_file() and not list(run_dir.glob(".*.tmp"))


def test_dpo_learns_held_out_preferences(tiny_model, pair_files, tmp_path):
    train, test = pair_files
    cfg = compose(
        "stage=dpo",
        *tiny_overrides(
            tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=30", "train.lr=1e-3"
        ),
    )
    m = execute(cfg, tmp_path / "dpo")
    assert m["eval/rewards/accuracies"] > 0.5
    assert m["eval/loss"] < math.log(2)
    assert m["eval/rewards/margins"] > 0
    # a normal run does not trip the collapse guard (default train.max_logp_drop)
    history = json.loads((tmp_path / "dpo" / "log_history.json").read_text())
    assert not any("collapse/logp_drop" in h for h in history)
    png = (tmp_path / "dpo" / "curves.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000


@pytest.mark.parametrize("on_collapse", ["warn", "stop"])
def test_dpo_collapse_guard_trips_on_a_huge_lr(tiny_model, sft_run, tmp_path, capsys, on_collapse):
    """From an SFT start that is confident on its answers, lr 0.1 wrecks the policy: the
    chosen answers lose far more than train.max_logp_drop (10) nats (measured ~90 by step 2,
    vs ~2 at lr 1e-3). A random tiny model cannot collapse: it is near-uniform already."""
    sft_dir, _ = sft_run
    rows = [
        json.loads(x) for x in (REPO / "reward_data" / "tiny_sft.jsonl").read_text().splitlines() if x.strip()
    ]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": r["messages"][:-1],
                "chosen": r["messages"][-1:],
                "rejected": rows[(i + 1) % len(rows)]["messages"][-1:],
            }
            for i, r in enumerate(rows)
        ],
    )
    cfg = compose(
        "stage=dpo",
        f"dpo.init={sft_dir}",
        *tiny_overrides(
            tiny_model,
            f"data.train={pairs}",
            f"data.eval={pairs}",
            "train.max_steps=6",
            "train.lr=0.1",
            f"train.on_collapse={on_collapse}",
        ),
    )
    if on_collapse == "stop":
        with pytest.raises(AlignError, match="training collapsed at step") as e:
            execute(cfg, tmp_path / "dpo")
        assert "train.max_logp_drop=10" in str(e.value) and "no adapter was saved" in str(e.value)
        assert not (tmp_path / "dpo" / "artifact.json").exists()
        return
    execute(cfg, tmp_path / "dpo")
    out = capsys.readouterr().out
    assert out.count("the model is collapsing") == 1  # warned once
    history = json.loads((tmp_path / "dpo" / "log_history.json").read_text())
    (entry,) = [h for h in history if "collapse/logp_drop" in h]
    assert entry["collapse/logp_drop"] > 10
    assert history[-1]["step"] == 6  # warn: training went on


def test_dpo_from_sft_uses_the_sft_adapter_as_policy_and_reference(tiny_model, pair_files, sft_run, tmp_path):
    train, test = pair_files
    sft_dir, _ = sft_run
    common = tiny_overrides(
        tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=1", "train.lr=1e-12"
    )
    chained = execute(compose("stage=dpo", f"dpo.init={sft_dir}", *common), tmp_path / "chained")
    from_base = execute(compose("stage=dpo", *common), tmp_path / "base")
    # reference == starting policy == SFT adapter: implicit rewards are ~0 ...
    assert abs(chained["eval/rewards/chosen"]) < 1e-3 and abs(chained["eval/rewards/rejected"]) < 1e-3
    # ... and that policy is the SFT model, not the raw base
    assert abs(chained["eval/logps/chosen"] - from_base["eval/logps/chosen"]) > 1.0
    manifest = json.loads((tmp_path / "chained" / "artifact.json").read_text())
    assert manifest["data"]["init"] == str(sft_dir) and manifest["data"]["reference"] == "init adapter"
    # only the trained adapter is saved (not DPO's frozen "ref" copy)
    weights = load_file(tmp_path / "chained" / "adapter" / "adapter_model.safetensors")
    assert weights and not any(".ref." in k for k in weights)


def test_dpo_init_must_be_a_finished_align_run(tiny_model, tmp_path):
    cfg = compose("stage=dpo", *tiny_overrides(tiny_model, f"dpo.init={tmp_path}"))
    with pytest.raises(AlignError, match="not a finished align run"):
        execute(cfg, tmp_path / "run")


def test_dpo_init_from_another_base_model_is_refused(tiny_model, sft_run, tmp_path):
    sft_dir, _ = sft_run
    cfg = compose("stage=dpo", *tiny_overrides(tiny_model, f"dpo.init={sft_dir}"))
    cfg.model.name_or_path = str(tmp_path)  # pretend this run uses another model
    with pytest.raises(AlignError, match="trained on base model"):
        execute(cfg, tmp_path / "run")


def test_wandb_offline_run_holds_the_logged_metrics(tiny_model, pair_files, tmp_path):
    train, test = pair_files
    cfg = compose(
        "stage=dpo",
        *tiny_overrides(tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=4"),
        "tracking=offline",
        "tracking.project=align-test",
    )
    m = execute(cfg, tmp_path / "run")
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run)
    losses = [h["train/loss"] for h in logged["history"] if "train/loss" in h]
    assert logged["complete"], "the W&B run file has no exit record"
    assert len(losses) == 4, [sorted(h) for h in logged["history"]]  # logging_steps=1
    assert logged["summary"]["eval/rewards/accuracies"] == pytest.approx(m["eval/rewards/accuracies"])
    assert logged["config"]["dpo"]["beta"] == 0.1 and logged["config"]["stage"] == "dpo"
    manifest = json.loads((tmp_path / "run" / "artifact.json").read_text())
    assert manifest["tracking"]["mode"] == "offline" and manifest["tracking"]["id"] in run.name


def test_gpu_peak_memory_is_reported_only_where_cuda_ran(monkeypatch):
    import torch

    from align import hardware

    assert hardware.gpu_peak_memory() == {}  # the suite runs on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1_440_000_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 1_640_000_000)
    assert hardware.gpu_peak_memory() == {
        "memory/gpu_peak_allocated_gb": 1.44,
        "memory/gpu_peak_reserved_gb": 1.64,
    }
