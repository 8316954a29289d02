"""Config composition, overrides, and the errors a user gets for bad keys and values."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, compose
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from align.config import DPO_LOSS_TYPES, AdapterKind, validate
from align.errors import AlignError


def test_default_is_dpo_on_embedded_smollm2_with_lora_and_offline_tracking():
    cfg = compose()
    assert cfg.stage == "dpo"
    assert cfg.model.name_or_path == "embedded:smollm2-135m"
    assert cfg.adapter.kind == AdapterKind.lora and cfg.adapter.bits == 0
    assert cfg.tracking.mode.value == "offline"
    validate(cfg)


def test_overrides_reach_every_section():
    cfg = compose(
        "stage=dpo",
        "model=qwen2.5-0.5b",
        "adapter=qlora",
        "adapter.r=32",
        "train.lr=5e-6",
        "train.max_steps=7",
        "data.train=some/file.jsonl",
        "tracking=disabled",
        "dpo.beta=0.05",
        "dpo.loss_type=ipo",
        "seed=3",
    )
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert cfg.adapter.kind == AdapterKind.qlora and cfg.adapter.bits == 4 and cfg.adapter.r == 32
    assert cfg.train.lr == 5e-6 and cfg.train.max_steps == 7
    assert cfg.data.train == "some/file.jsonl"
    assert cfg.tracking.mode.value == "disabled"
    assert cfg.dpo.beta == 0.05 and cfg.dpo.loss_type == "ipo" and cfg.seed == 3
    validate(cfg)


@pytest.mark.parametrize(
    "name", ["smollm2-135m", "qwen2.5-0.5b-instruct", "llama-3.1-8b-instruct", "mistral-7b-instruct"]
)
def test_shipped_model_configs_compose(name):
    cfg = compose(f"model={name}")
    assert cfg.model.name == name and cfg.model.max_length >= 256 and cfg.model.lora_target_modules


@pytest.mark.parametrize(
    "adapter,kind,bits",
    [
        ("lora", "lora", 0),
        ("qlora", "qlora", 4),
        ("dora", "dora", 0),
        ("none", "none", 0),
        ("freeze", "freeze", 0),
        ("prefix", "prefix", 0),
        ("prompt", "prompt", 0),
        ("ia3", "ia3", 0),
    ],
)
def test_adapter_group(adapter, kind, bits):
    cfg = compose(f"adapter={adapter}")
    assert cfg.adapter.kind.value == kind and cfg.adapter.bits == bits


def test_dpo_lr_defaults_lower_from_an_sft_start_and_an_explicit_lr_wins():
    # 5e-4 from the base; from an SFT adapter it collapsed the policy (README), so 5e-5 there
    assert compose("stage=dpo").train.lr == pytest.approx(5e-4)
    assert compose("stage=dpo", "dpo.init=/some/sft/run").train.lr == pytest.approx(5e-5)
    assert compose("stage=dpo", "dpo.init=/some/sft/run", "train.lr=1e-3").train.lr == pytest.approx(1e-3)
    assert compose("stage=dpo", "train.lr=2e-4").train.lr == pytest.approx(2e-4)


def test_misspelt_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train.lrr=1")
    assert "lrr" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train.lr=fast")
    assert "train.lr" in str(e.value) or "train.lr" in str(e.value.__cause__)


def test_bad_enum_value_lists_choices():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose("adapter.kind=bogus")
    text = str(e.value) + str(e.value.__cause__)
    assert "qlora" in text


def test_unknown_stage_lists_stages():
    with pytest.raises(ConfigCompositionException) as e:
        compose("stage=nope")
    assert "dpo" in str(e.value) and "sft" in str(e.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["dpo.loss_type=bogus"], "dpo.loss_type"),
        (["adapter=qlora", "adapter.bits=0"], "adapter=qlora"),
        (["adapter.bits=3"], "adapter.bits"),
        (["train.lr=-1"], "train.lr"),
        (["dpo.beta=0"], "dpo.beta"),
        (["dpo.loss_type=sigmoid+sft", "dpo.loss_weights=[1.0]"], "dpo.loss_weights"),
    ],
)
def test_validate_names_the_bad_key(overrides, key):
    with pytest.raises(AlignError) as e:
        validate(compose(*overrides))
    assert key in str(e.value)


def test_every_trl_dpo_loss_is_accepted():
    from trl import DPOConfig

    for loss in DPO_LOSS_TYPES:
        validate(compose(f"dpo.loss_type={loss}"))
    # TRL's own documentation of DPOConfig.loss_type lists exactly these
    doc = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = {
        x.strip("`'")
        for x in doc.split("Possible values are:")[1].split(". If")[0].replace("`", "").split(",")
    }
    listed = {x.strip().strip("'") for x in listed if x.strip()}
    assert listed == set(DPO_LOSS_TYPES)


def _run_cli(*args, env=None, timeout=60):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "align", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=e,
        timeout=timeout,
    )


def test_cli_help_and_cfg_job_are_fast_and_import_no_torch():
    for args in (["--help"], ["--cfg", "job"]):
        t = time.perf_counter()
        r = _run_cli(*args)
        elapsed = time.perf_counter() - t
        assert r.returncode == 0, r.stderr
        assert elapsed < 3.0, f"python -m align {' '.join(args)} took {elapsed:.2f}s"
    assert "stage: dpo" in _run_cli("--cfg", "job").stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, align.__main__, align.config; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert probe.stdout.strip() == "False"


def test_cli_rejects_misspelt_key_before_any_work():
    r = _run_cli("train.lrr=1")
    assert r.returncode != 0 and "lrr" in r.stderr


def test_cli_validation_error_is_one_line_without_traceback(tmp_path):
    r = _run_cli("dpo.loss_type=bogus", f"hydra.run.dir={tmp_path}/run", "tracking=disabled")
    assert r.returncode == 2
    assert "align: error: dpo.loss_type='bogus'" in r.stderr
    assert "Traceback" not in r.stderr
