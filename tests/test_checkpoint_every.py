"""train.checkpoint_every: gradient checkpointing on every n-th decoder layer only (stage=dpo's
default, 0 = auto, is every 2nd layer on CPU with jemalloc, within plain TRL's peak memory at
less recompute, and every layer on CUDA or on glibc's malloc)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_overrides

from align import backbone
from align.errors import AlignError


def lora_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return model


def grads(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_nth_layer_recomputes_those_layers_and_gives_the_same_gradients(tiny_model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = torch.randint(0, 400, (2, 24))
    model = lora_model(tiny_model)
    plain = grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert backbone.checkpoint_every_nth_layer(model, 2) == 1  # 2 layers: layer 0 only
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, False]
    partial = grads(model, ids)
    assert plain.keys() == partial.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(partial[n], plain[n], rtol=1e-5, atol=1e-6)
    # every=1 leaves checkpointing as it is; without checkpointing nothing is switched on
    model.gradient_checkpointing_disable()
    assert backbone.checkpoint_every_nth_layer(model, 2) == 0


def test_stage_defaults_and_bad_values(tiny_model, monkeypatch):
    from align import malloc

    dpo = compose("stage=dpo", "device=cpu")
    assert dpo.train.gradient_checkpointing is True and dpo.train.checkpoint_every == 0  # auto
    monkeypatch.setattr(malloc, "loaded", lambda: "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    rt = backbone.detect_runtime(dpo)
    assert rt.gradient_checkpointing and rt.checkpoint_every == 2  # CPU on jemalloc: every 2nd layer
    monkeypatch.setattr(malloc, "loaded", lambda: None)
    assert backbone.detect_runtime(dpo).checkpoint_every == 1  # CPU on glibc: every layer
    monkeypatch.setattr(malloc, "loaded", lambda: "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backbone.detect_runtime(compose("stage=dpo", "device=cuda")).checkpoint_every == 1  # GPU: all
    monkeypatch.undo()
    assert compose("stage=sft").train.checkpoint_every == 1
    assert backbone.detect_runtime(compose("stage=dpo", "train.checkpoint_every=3")).checkpoint_every == 3
    with pytest.raises(AlignError, match="train.checkpoint_every=-1"):
        backbone.detect_runtime(compose("stage=dpo", "train.checkpoint_every=-1"))


def test_dpo_trains_with_every_second_layer_checkpointed(tiny_model, tmp_path, caplog):
    from align.stages import execute

    cfg = compose(
        "stage=dpo",
        *tiny_overrides(
            tiny_model, "data=tiny", "train.max_steps=2", "data.max_eval_rows=4", "train.checkpoint_every=2"
        ),
    )
    with caplog.at_level("INFO", logger="align.backbone"):
        m = execute(cfg, tmp_path / "dpo")
    assert m["train/global_step"] == 2
    assert "gradient checkpointing on 1 decoder layers (train.checkpoint_every=2)" in caplog.text
