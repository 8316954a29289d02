"""The CUDA paths: 4-bit QLoRA with bf16 compute, sampling, the PPO rollout and a classifier
on the GPU. Skipped without a visible CUDA device; the rest of the suite runs on the CPU (see
conftest.py), so on a GPU machine run these with

    ALIGN_TEST_CUDA=1 pytest tests/test_cuda.py
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (ALIGN_TEST_CUDA=1)")

PROMPTS = [
    {"prompt": [{"role": "user", "content": t}]} for t in ("Tell me about bees.", "Write about water.")
]


def _cfg(tiny_model, *extra: str):
    return compose(*tiny_overrides(tiny_model, "device=cuda", *extra))


def _lora_on_cuda(tiny_model, dtype: str):
    """The tiny model on the GPU in ``dtype`` with a LoRA whose B is not zero, in eval mode."""
    from peft import get_peft_model

    from align import backbone

    bb = backbone.build(_cfg(tiny_model, "adapter.r=4", f"model.dtype={dtype}"))
    torch.manual_seed(0)
    model = get_peft_model(bb.model, bb.peft_config)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model.eval()


def test_qlora_on_cuda_is_nf4_with_bf16_compute_and_trains_only_adapters(tiny_model):
    import bitsandbytes as bnb
    from peft import get_peft_model

    from align import backbone

    cfg = _cfg(tiny_model, "adapter=qlora", "adapter.r=4")
    bb = backbone.build(cfg)
    assert bb.runtime.device == "cuda" and bb.runtime.dtype == torch.bfloat16
    four_bit = [m for m in bb.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7 and four_bit[0].weight.device.type == "cuda"
    assert four_bit[0].compute_dtype == torch.bfloat16 and four_bit[0].weight.quant_state.nested
    model = get_peft_model(bb.model, bb.peft_config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]], device="cuda")
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_sampling_on_cuda_is_greedy_generate_and_unmerges_exactly(tiny_model):
    from align import sampling

    model = _lora_on_cuda(tiny_model, "float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    done = sampling.sample(model, prompts, sampling.SamplingParams(max_new_tokens=8), stop=[], pad_id=0)
    for ids, c in zip(prompts, done, strict=True):  # one prompt at a time: no padding in generate
        want = model.generate(
            torch.tensor([ids], device="cuda"), max_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
        assert c.ids == want
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # merge undone exactly


def test_ppo_on_a_qlora_base_rolls_out_and_updates_on_cuda(tiny_model, tmp_path):
    from align.stages import execute

    sft = execute(
        compose(
            *tiny_overrides(
                tiny_model, "device=cuda", "stage=sft", "data=tiny", "adapter=qlora", "train.max_steps=2"
            )
        ),
        tmp_path / "sft",
    )
    assert sft["memory/gpu_peak_allocated_gb"] > 0
    m = execute(
        compose(
            *tiny_overrides(
                tiny_model,
                "device=cuda",
                "stage=ppo",
                "adapter=qlora",
                f"ppo.policy={tmp_path / 'sft'}",
                "ppo.reward=judge:ifeval",
                "train.max_steps=2",
                "ppo.max_new_tokens=8",
            )
        ),
        tmp_path / "ppo",
    )
    assert m["time/step_s"] > 0 and torch.isfinite(torch.tensor(m["objective/kl"]))
    assert m["memory/gpu_peak_allocated_gb"] > 0


def test_classifier_head_trains_on_a_qlora_base_on_cuda(tiny_model, tmp_path):
    from align.stages import execute

    m = execute(
        compose(
            *tiny_overrides(
                tiny_model,
                "device=cuda",
                "stage=classify",
                "adapter=qlora",
                "data.max_train_rows=32",
                "data.max_eval_rows=16",
                "train.max_steps=12",
                "train.lr=1e-3",
            )
        ),
        tmp_path / "cls",
    )
    assert m["train/loss"] < m["train/first_loss"] and 0 <= m["eval/roc_auc"] <= 1


def test_sampling_merges_a_bf16_base_in_place_on_cuda_and_restores_it_to_the_bit(tiny_model):
    from align import sampling

    model = _lora_on_cuda(tiny_model, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    params = sampling.SamplingParams(max_new_tokens=8)
    done = sampling.sample(model, prompts, params, stop=[], pad_id=0)
    assert [len(c.ids) for c in done] == [8, 8]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # restored to the bit
    again = sampling.sample(model, prompts, params, stop=[], pad_id=0)  # greedy: the same merge again
    assert [c.ids for c in again] == [c.ids for c in done]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "adapter",
    [
        "lora",
        pytest.param(
            "prompt",
            marks=pytest.mark.xfail(
                strict=False,
                reason="on an H200 (2026-11-30) prompt tuning at lr 0.1 oscillated (0.81 -> 2.89 -> 0.41 -> 1.19) "
                "where the CPU, bf16 or fp32, falls to 0.02 with the same settings; not yet explained",
            ),
        ),
    ],
)
def test_classifier_head_on_a_bf16_base_is_fp32_and_learns_on_cuda(tiny_model, tmp_path, adapter):
    from align.stages import execute

    m = execute(
        compose(
            *tiny_overrides(
                tiny_model,
                "device=cuda",
                "stage=classify",
                f"adapter={adapter}",
                "model.dtype=bfloat16",
                "data.max_train_rows=32",
                "data.max_eval_rows=16",
                "train.max_steps=12",
                "train.batch_size=4",
                f"train.lr={'1e-1' if adapter == 'prompt' else '1e-3'}",  # as tests/test_methods.py
            )
        ),
        tmp_path / "cls",
    )
    assert m["train/loss"] < m["train/first_loss"], m
