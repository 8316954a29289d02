"""SFT packing (padding-free batches) and bf16 autocast: both must leave the loss unchanged."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import compose, tiny_overrides

from align import backbone
from align.config import Autocast
from align.stages import execute


def _rows(vocab: int, lengths: list[int]) -> list[dict]:
    rng = random.Random(0)
    return [{"input_ids": [rng.randrange(4, vocab) for _ in range(n)]} for n in lengths]


def test_packed_padding_free_batch_has_the_same_loss_as_the_padded_batch(tiny_model):
    """A padding-free batch is one flat sequence; transformers must rebuild the per-example
    attention from position_ids. It does only when no KV cache is made (TRL's SFTTrainer passes
    use_cache=False): with use_cache=True examples would attend across their boundaries."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.train()  # tiny Llama has no dropout: train mode is deterministic
    rows = _rows(model.config.vocab_size, [9, 23, 5, 14])
    pad = model.config.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, 9 + 23 + 5 + 14) and "attention_mask" not in packed
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
        loss_leaky = model(**packed, use_cache=True).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), abs=1e-5)
    assert abs(loss_leaky.item() - loss_padded.item()) > 1e-4  # the trap the comment above names


def test_sft_packing_trains_on_more_tokens_per_step_and_learns(tiny_model, tmp_path):
    """Same rows, steps and batch size: packed rows of up to model.max_length tokens hold about
    two tiny examples each, so a packed step trains on about twice the tokens, and the loss falls."""
    runs = {}
    for packing in ("false", "true"):
        cfg = compose(
            "stage=sft",
            *tiny_overrides(
                tiny_model,
                "data=tiny",
                f"train.packing={packing}",
                "train.max_steps=16",
                "train.lr=1e-2",
                "train.batch_size=2",
                "model.max_length=512",
            ),
        )
        runs[packing] = execute(cfg, tmp_path / packing)
    padded, packed = runs["false"], runs["true"]
    assert packed["train/num_tokens"] > 1.6 * padded["train/num_tokens"]
    assert packed["train/loss"] < packed["train/first_loss"] - 0.7


@pytest.mark.parametrize("native_bf16", [False, True])
def test_autocast_auto_follows_the_hardware_and_can_be_forced_either_way(monkeypatch, native_bf16):
    monkeypatch.setattr(backbone, "cpu_computes_bf16", lambda: native_bf16)
    cfg = compose("stage=sft", "device=cpu")
    rt = backbone.detect_runtime(cfg)
    assert rt.autocast_dtype == (torch.bfloat16 if native_bf16 else None)
    assert rt.trainer_kwargs()["bf16"] is native_bf16
    cfg.train.autocast = Autocast.bf16  # forced on, emulated where the CPU lacks bf16
    rt = backbone.detect_runtime(cfg)
    assert rt.autocast_dtype == torch.bfloat16 and rt.trainer_kwargs()["bf16"] is True
    cfg.model.dtype = "bfloat16"  # bf16 weights compute in bf16 already: no autocast on top
    assert backbone.detect_runtime(cfg).autocast_dtype is None
    cfg.model.dtype = "float32"
    cfg.train.autocast = Autocast.none  # forced off, even on a bf16 CPU
    rt = backbone.detect_runtime(cfg)
    assert rt.autocast_dtype is None and rt.trainer_kwargs()["bf16"] is False


def test_bf16_autocast_loss_curve_matches_fp32(tiny_model, tmp_path):
    """The same SFT run in fp32 and under bf16 autocast (forced; emulated where the CPU lacks
    AVX512-BF16): every logged loss within a few percent, and both learn."""
    curves = {}
    for mode in ("none", "bf16"):
        cfg = compose(
            "stage=sft",
            *tiny_overrides(
                tiny_model,
                "data=tiny",
                f"train.autocast={mode}",
                "train.max_steps=12",
                "train.lr=1e-2",
                "train.batch_size=4",
            ),
        )
        run = tmp_path / mode
        execute(cfg, run)
        log = json.loads((run / "log_history.json").read_text())
        curves[mode] = [e["loss"] for e in log if "loss" in e]
    fp32, bf16 = curves["none"], curves["bf16"]
    assert len(fp32) == len(bf16) == 12
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.03)
    assert fp32[-1] < fp32[0] - 0.4 and bf16[-1] < bf16[0] - 0.4
