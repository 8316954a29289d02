"""stage=export: the merged model loads with plain transformers and computes what the
adapter model computes; the model card carries the lineage; push needs credentials."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, tiny_overrides

from align.errors import AlignError
from align.stages import execute

ATOL = 1e-4


def _train(tiny_model, run_dir, *extra, stage="sft"):
    cfg = compose(
        f"stage={stage}",
        *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=2", "train.lr=5e-2", *extra),
    )
    execute(cfg, run_dir)
    return run_dir


def _export(run_dir, out_dir, *extra):
    execute(compose("stage=export", f"export.from={run_dir}", "tracking=disabled", *extra), out_dir)
    return out_dir / "model"


def _logits(model, tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me about bees."}], tokenize=False)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    sft = _train(tiny_model, d / "sft")
    dpo = _train(tiny_model, d / "dpo", f"dpo.init={sft}", stage="dpo")
    return d, sft, dpo


def test_export_loads_with_plain_transformers_and_matches_the_adapter_model(tiny_model, chain):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, sft, dpo = chain
    model_dir = _export(dpo, d / "exported")
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    assert (model_dir / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template  # the chat template travels with the model
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), dpo / "adapter")
    a, b = _logits(merged, tok), _logits(reference, tok)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), tok)
    assert (a - base).abs().max() > 1e-2  # the adapter changed something ...
    diff = (a - b).abs().max().item()
    print(f"max |logit difference| export vs adapter model: {diff:.2e}")
    assert diff < ATOL  # ... and the export computes exactly that

    card = (model_dir / "README.md").read_text()
    assert "### 1. stage=sft" in card and "### 2. stage=dpo" in card
    assert str(sft) in card and "tiny_pairs.jsonl" in card and "eval/rewards/accuracies" in card
    manifest = json.loads((d / "exported" / "artifact.json").read_text())
    assert manifest["stage"] == "export" and manifest["data"]["lineage"] == [str(dpo), str(sft)]


def test_qlora_export_is_dequantized(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _train(tiny_model, tmp_path / "q", "adapter=qlora")
    model_dir = _export(run, tmp_path / "qx")
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_push_to_hub_without_credentials_is_a_clear_error(chain, tmp_path, monkeypatch):
    d, _, dpo = chain
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached token
    with pytest.raises(AlignError, match="needs Hugging Face credentials"):
        _export(dpo, tmp_path / "push", "export.push_to_hub=true", "export.hub_id=me/tiny")
    assert (tmp_path / "push" / "model" / "model.safetensors").is_file()  # saved locally either way


def test_export_needs_a_finished_run(tmp_path):
    with pytest.raises(AlignError, match="export.from=.*not a finished align run"):
        _export(tmp_path, tmp_path / "x")
