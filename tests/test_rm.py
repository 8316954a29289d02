"""stage=rm: TRL RewardTrainer on a LoRA (SEQ_CLS) + score head, on the tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import compose, tiny_overrides, write_jsonl


def separable_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(["water", "bees", "river", "ocean", "forest", "music", "rain"])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
                "chosen": [{"role": "assistant", "content": f"The {topic} is good, good."}],
                "rejected": [{"role": "assistant", "content": f"The {topic} is bad, bad."}],
            }
        )
    return rows


def test_rm_learns_a_separable_preference_and_saves_its_score_head(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from align.stages import execute

    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(40, 0))
    held_out = write_jsonl(tmp_path / "test.jsonl", separable_pairs(16, 1))
    cfg = compose(
        "stage=rm",
        *tiny_overrides(
            tiny_model, f"data.train={train}", f"data.eval={held_out}", "train.max_steps=8", "train.lr=3e-3"
        ),
    )
    metrics = execute(cfg, tmp_path / "rm")
    assert metrics["eval/accuracy"] > 0.5
    assert metrics["eval/margin"] > 0
    assert metrics["train/loss"] < metrics["train/first_loss"]
    manifest = json.loads((tmp_path / "rm" / "artifact.json").read_text())
    assert manifest["stage"] == "rm"
    weights = load_file(tmp_path / "rm" / "adapter" / "adapter_model.safetensors")
    assert tuple(weights["base_model.model.score.weight"].shape) == (1, 64)  # the trained head PPO loads
    assert any("lora_A" in k for k in weights)


def test_rm_config_rejects_ppo_without_reward():
    import pytest

    from align.config import validate
    from align.errors import AlignError

    with pytest.raises(AlignError, match="ppo.reward"):
        validate(compose("stage=ppo"))
    with pytest.raises(AlignError, match="ppo.kl_estimator"):
        validate(compose("stage=ppo", "ppo.reward=judge:ifeval", "ppo.kl_estimator=k2"))


def test_rm_margin_column_reaches_the_loss_and_a_bad_margin_names_its_row(tiny_model, tmp_path):
    """RewardTrainer's margin loss is -logsigmoid(r_chosen - r_rejected - margin): with the
    rewards ~0 at the start, the first loss is ~softplus(margin) (2.13 for 2.0), not ln 2."""
    import math

    import pytest

    from align.errors import AlignError
    from align.stages import execute

    rows = [r | {"margin": 2.0} for r in separable_pairs(24, 0)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    overrides = tiny_overrides(tiny_model, f"data.train={train}", "train.max_steps=1", "train.lr=1e-6")
    metrics = execute(compose("stage=rm", *overrides), tmp_path / "rm")
    assert metrics["train/first_loss"] == pytest.approx(math.log1p(math.exp(2.0)), abs=0.25)
    # the same rows feed DPO, which has no margin: the column is ignored there
    dpo = execute(compose("stage=dpo", *overrides), tmp_path / "dpo")
    assert dpo["train/first_loss"] == pytest.approx(math.log(2), abs=0.05)

    rows[3]["margin"] = "big"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(AlignError, match=r"bad.jsonl:4: 'margin' must be a finite number"):
        execute(compose("stage=rm", *tiny_overrides(tiny_model, f"data.train={bad}")), tmp_path / "bad")


def _saved_causal_lora(cfg, tmp_path):
    """A CAUSAL_LM LoRA as an SFT run saves it, with non-zero B matrices (a trained one)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align import backbone

    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    peft_model = get_peft_model(model, backbone.peft_config(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "sft-adapter")
    return tmp_path / "sft-adapter", {
        k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k
    }


def test_reward_model_starts_from_the_sft_lora_weights_with_a_new_head(tiny_model, tmp_path):
    import pytest

    from align import backbone
    from align.errors import AlignError

    cfg = compose("stage=rm", *tiny_overrides(tiny_model))
    adapter_dir, saved = _saved_causal_lora(cfg, tmp_path)
    bb = backbone.start_from_weights(backbone.build(cfg, task="seq_cls"), adapter_dir)
    assert bb.peft_config is None  # the trainer trains the adapter as it is
    state = bb.model.state_dict()
    for key, value in saved.items():  # every LoRA tensor, under the reward model's own names
        assert key in state and state[key].equal(value), key
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("lora_" not in n and "score" not in n for n in trainable)  # the base stays frozen
    # a LoRA of another shape is refused with what differs
    other = compose("stage=rm", *tiny_overrides(tiny_model, "adapter.r=4"))
    with pytest.raises(AlignError, match="r: saved 16, this run 4"):
        backbone.start_from_weights(backbone.build(other, task="seq_cls"), adapter_dir)


def test_rm_score_head_starts_from_the_run_seed_in_any_process_state(tiny_model, tmp_path):
    """The score head is made before the trainer seeds: it follows ``seed=`` whatever the
    process's generator did before (a fresh process, or an earlier sub-run of stage=rlhf)."""
    import torch
    from safetensors.torch import load_file

    from align.stages import execute

    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(8, 0))
    args = [f"data.train={train}", "data.eval_fraction=0", "train.max_steps=1"]
    heads = []
    for i, seed in enumerate((42, 42, 7)):
        torch.manual_seed(1000 + i)  # a different generator state before every run
        execute(compose("stage=rm", *tiny_overrides(tiny_model, *args, f"seed={seed}")), tmp_path / f"rm{i}")
        weights = load_file(tmp_path / f"rm{i}" / "adapter" / "adapter_model.safetensors")
        heads.append(weights["base_model.model.score.weight"])
    assert torch.equal(heads[0], heads[1])  # same seed: same start, same data, same step
    assert not torch.equal(heads[0], heads[2])


def test_rm_head_init_std_zero_starts_every_reward_at_zero_and_still_learns(tiny_model, tmp_path):
    """rm.head_init_std=0: the fresh head is zeros (every reward 0 before training, no random
    ranking to unlearn); the head and, from the second step, the LoRA learn the preference."""
    import torch

    from align import backbone
    from align.stages import execute

    cfg = compose("stage=rm", *tiny_overrides(tiny_model, "rm.head_init_std=0"))
    model = backbone.build(cfg, task="seq_cls").model
    backbone.init_score_head(model, cfg.rm.head_init_std)
    assert torch.count_nonzero(model.score.weight) == 0
    backbone.init_score_head(model, 0.5)
    assert 0.4 < model.score.weight.std().item() < 0.6

    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(40, 0))
    held_out = write_jsonl(tmp_path / "test.jsonl", separable_pairs(16, 1))
    extra = [
        f"data.train={train}",
        f"data.eval={held_out}",
        "train.max_steps=8",
        "train.lr=3e-3",
        "rm.head_init_std=0",
    ]
    metrics = execute(compose("stage=rm", *tiny_overrides(tiny_model, *extra)), tmp_path / "rm")
    assert metrics["train/first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # all rewards 0: ln 2
    assert metrics["train/loss"] < metrics["train/first_loss"] and metrics["eval/accuracy"] > 0.5
