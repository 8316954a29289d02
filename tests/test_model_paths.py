"""model.name_or_path as users really set it: a wrong path, a hub id without a hub, a directory
that is not a model (no weights, only a tokenizer, an adapter, an align run) or a quantized
checkpoint with adapter=none. Each is one AlignError naming model.name_or_path and what to
do, raised by backbone.py before any weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose, tiny_overrides

from align import backbone
from align.errors import AlignError


def _copy(tiny_model: Path, dest: Path, *drop: str) -> Path:
    shutil.copytree(tiny_model, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


def _refuse(path: Path | str, *extra: str) -> str:
    cfg = compose(*tiny_overrides(path, *extra))
    with pytest.raises(AlignError) as e:
        backbone.resolve_model_path(cfg.model, cfg.adapter)
    return str(e.value)


@pytest.fixture(autouse=True)
def _no_loading(monkeypatch):
    """Every check here must come before transformers loads anything."""
    import transformers

    def refuse(*args, **kwargs):
        raise RuntimeError("loaded before the model path was checked")

    for cls in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse)


def test_a_path_that_does_not_exist():
    msg = _refuse("/path/that/does/not/exist")
    assert (
        msg
        == "model.name_or_path=/path/that/does/not/exist: no such directory, and not a hub id (owner/name)"
    )
    assert "no such directory, and not a hub id" in _refuse("./models/mine")
    assert "no such directory, and not a hub id" in _refuse("a/b/c")


def test_a_hub_id_without_the_hub(monkeypatch):
    # HF_HUB_OFFLINE=1 (conftest): what transformers raises then, said in align's words
    cfg = compose(*tiny_overrides(Path("owner/not-cached")))
    assert backbone.resolve_model_path(cfg.model, cfg.adapter) == "owner/not-cached"
    offline = OSError(
        "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them"
    )
    msg = str(backbone._load_failure("a tokenizer", "owner/not-cached", offline))
    assert msg.startswith(
        "model.name_or_path=owner/not-cached: no directory 'owner/not-cached' here, and the hub is off "
        "(HF_HUB_OFFLINE is set), with no copy in the local hub cache"
    )
    assert "hf download owner/not-cached --local-dir <dir>" in msg and "model.name_or_path=<dir>" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "the Hugging Face Hub is unreachable, with no copy" in str(
        backbone._load_failure("the model", "owner/not-cached", offline)
    )
    missing = OSError(
        "owner/typo is not a local folder and is not a valid model identifier listed on the hub"
    )
    assert "no such model on the Hugging Face Hub (check the spelling" in str(
        backbone._load_failure("a tokenizer", "owner/typo", missing)
    )


def test_directories_that_are_not_a_model(tiny_model, tmp_path):
    no_weights = _copy(tiny_model, tmp_path / "no-weights", "model.safetensors")
    assert _refuse(no_weights) == (
        f"model.name_or_path={no_weights} has config.json but no weights (*.safetensors); the download is "
        "incomplete, or this is a config/tokenizer-only directory: give the full model directory"
    )
    tok_only = _copy(tiny_model, tmp_path / "tokenizer-only", "model.safetensors", "config.json")
    assert f"model.name_or_path={tok_only} holds a tokenizer but no model (no config.json" in _refuse(
        tok_only
    )
    (tmp_path / "empty").mkdir()
    assert "is not a model directory (no config.json)" in _refuse(tmp_path / "empty")
    no_tok = _copy(tiny_model, tmp_path / "no-tokenizer", "tokenizer.json", "tokenizer_config.json")
    assert f"model.name_or_path={no_tok} has no tokenizer" in _refuse(no_tok)
    pickled = _copy(tiny_model, tmp_path / "pickled", "model.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert "has only pickled PyTorch weights (pytorch_model.bin); align loads safetensors" in _refuse(pickled)
    sharded = _copy(tiny_model, tmp_path / "sharded")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "2 of the 2 weight files model.safetensors.index.json lists are missing" in _refuse(sharded)
    assert "is a file; give a model directory (the directory that holds it)" in _refuse(
        tiny_model / "model.safetensors"
    )


def test_an_adapter_or_an_align_run_says_what_to_use_instead(tmp_path):
    adapter = tmp_path / "downloaded-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "owner/base-7b"}))
    msg = _refuse(adapter)
    assert msg.startswith(
        f"model.name_or_path={adapter} is a LoRA adapter (adapter_config.json), not a model"
    )
    assert "set model.name_or_path to the base it was trained on ('owner/base-7b')" in msg
    assert "dpo.init=, ppo.policy= or grpo.init=" in msg

    run = tmp_path / "sft-run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "owner/base"})
    )
    manifest = {"format": "align-artifact/1", "stage": "sft", "base_model": {"name_or_path": "owner/base"}}
    (run / "artifact.json").write_text(json.dumps(manifest))
    assert f"start from the adapter with dpo.init={run} (or ppo.policy=, grpo.init=)" in _refuse(
        run / "adapter"
    )
    msg = _refuse(run)
    assert f"model.name_or_path={run} is an align run (stage=sft), not a base model" in msg
    assert "its base ('owner/base')" in msg and f"dpo.init={run}" in msg

    export = tmp_path / "export-run"
    (export / "model").mkdir(parents=True)
    (export / "artifact.json").write_text(json.dumps(manifest | {"stage": "export"}))
    assert f"its merged model is {export / 'model'}: set model.name_or_path={export / 'model'}" in _refuse(
        export
    )


def test_quantized_checkpoint_needs_an_adapter(tiny_model, tmp_path):
    quant = _copy(tiny_model, tmp_path / "model-bnb-4bit")
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quant / "config.json").write_text(json.dumps(config))
    msg = _refuse(quant, "adapter=none")
    assert msg.startswith(
        f"model.name_or_path={quant} is a quantized checkpoint (quantization_config: bitsandbytes), and "
        "adapter=none (full fine-tuning) cannot train quantized weights: use adapter=lora"
    )
    cfg = compose(*tiny_overrides(quant, "adapter=lora"))
    assert backbone.resolve_model_path(cfg.model, cfg.adapter) == str(quant)
    # the stages' entry points check it too, before the tokenizer or the model loads
    cfg = compose(*tiny_overrides(quant, "adapter=none"))
    for entry in (backbone.tokenizer_for, backbone.build):
        with pytest.raises(AlignError, match="is a quantized checkpoint"):
            entry(cfg)
    with pytest.raises(AlignError, match="is a quantized checkpoint"):
        backbone.load_base_model(str(quant), cfg, backbone.detect_runtime(cfg))


def test_a_good_directory_passes(tiny_model):
    cfg = compose(*tiny_overrides(tiny_model))
    assert backbone.resolve_model_path(cfg.model, cfg.adapter) == str(tiny_model)
