"""stage=grpo and stage=rloo on the tiny model: the reward rises under GRPO, RLOO takes a
real step, and the reward plumbing (align/rewards.py) refuses what it cannot use."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from conftest import compose, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from align import rewards
from align.errors import AlignError
from align.stages import execute

TARGET: set[int] = set()  # token ids the reward favours; set by the `target_tokens` fixture


def target_token_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A judge-like programmatic reward: the fraction of generated tokens in TARGET."""
    return [sum(1 for t in ids if t in TARGET) / max(len(ids), 1) for ids in completion_ids]


@pytest.fixture(scope="module")
def target_tokens(tiny_model):
    """Half the vocabulary: the tokens whose LM-head rows point along one random direction,
    so a policy can favour them all by moving its last hidden state (base rate ~0.5)."""
    import torch

    w = load_file(tiny_model / "model.safetensors")["lm_head.weight"]
    d = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
    TARGET.clear()
    TARGET.update((w @ d > 0).nonzero().flatten().tolist())
    return TARGET


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["water", "bees", "music", "snow", "rain", "stars", "river", "forest"]
    rows = [
        {
            "id": f"p{i}",
            "prompt": [
                {"role": "user", "content": f"Tell me about {rng.choice(words)} and {rng.choice(words)}."}
            ],
            "constraints": [{"type": "lowercase"}],
        }
        for i in range(64)
    ]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def _rl(stage: str, tiny_model, prompt_file, *extra: str):
    return compose(
        f"stage={stage}",
        *tiny_overrides(tiny_model, f"data.train={prompt_file}", "data.eval_fraction=0"),
        f"{stage}.reward=fn:test_grpo:target_token_reward",
        f"{stage}.max_completion_length=8",
        f"{stage}.num_generations=4",
        "train.batch_size=16",
        *extra,
    )


def count_sampling_calls(monkeypatch) -> list[int]:
    """GRPO/RLOO sample through align.sampling (not model.generate): count the batches."""
    from align import sampling

    calls, real = [], sampling.sample

    def counted(model, prompt_ids, *a, **kw):
        calls.append(len(prompt_ids))
        return real(model, prompt_ids, *a, **kw)

    monkeypatch.setattr(sampling, "sample", counted)
    return calls


def test_grpo_raises_the_reward(tiny_model, prompt_file, target_tokens, tmp_path, monkeypatch):
    calls = count_sampling_calls(monkeypatch)
    cfg = _rl("grpo", tiny_model, prompt_file, "train.max_steps=12", "train.lr=2e-2", "grpo.beta=0.0")
    m = execute(cfg, tmp_path / "grpo")
    assert calls and sum(calls) >= 12 * 16  # every completion of every step
    history = json.loads((tmp_path / "grpo" / "metrics.json").read_text())
    assert history["train/global_step"] == 12
    log = [e for e in _log_history(tmp_path / "grpo") if "reward" in e]
    assert len(log) == 12  # logging_steps=1
    first = sum(e["reward"] for e in log[:3]) / 3
    last = sum(e["reward"] for e in log[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert m["train/first_reward"] == pytest.approx(log[0]["reward"])
    manifest = json.loads((tmp_path / "grpo" / "artifact.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["data"]["reward"] == "fn:test_grpo:target_token_reward"
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def _log_history(run_dir):
    """The per-step log of the run (metrics.json keeps the last values only)."""
    return json.loads((run_dir / "log_history.json").read_text())


def test_rloo_takes_a_real_step_and_records_the_reward(
    tiny_model, prompt_file, target_tokens, tmp_path, monkeypatch
):
    calls = count_sampling_calls(monkeypatch)
    cfg = _rl("rloo", tiny_model, prompt_file, "train.max_steps=1", "train.lr=1e-2", "train.batch_size=8")
    m = execute(cfg, tmp_path / "rloo")
    assert sum(calls) == 8
    assert m["train/global_step"] == 1
    assert 0.0 <= m["train/reward"] <= 1.0 and "train/kl" in m  # rloo.beta=0.05: a reference is used
    weights = load_file(tmp_path / "rloo" / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(float(w.abs().max()) > 0 for w in lora_b)  # LoRA B starts at 0: the step moved it


def test_reward_specs_are_checked(tiny_model, prompt_file, tmp_path):
    cfg = compose("stage=grpo", *tiny_overrides(tiny_model))
    fns = rewards.resolve("judge:ifeval+fn:test_grpo:target_token_reward", cfg, key="grpo.reward")
    assert [f.__name__ for f in fns] == ["ifeval_reward", "target_token_reward"]
    with pytest.raises(AlignError, match="grpo.reward=judge:nope"):
        rewards.resolve("judge:nope", cfg, key="grpo.reward")
    with pytest.raises(AlignError, match="not judge:<name>"):
        rewards.resolve(str(tmp_path / "missing"), cfg, key="grpo.reward")
    with pytest.raises(AlignError, match="reward_weights has 1 weights for 2 rewards"):
        execute(
            _rl(
                "grpo",
                tiny_model,
                prompt_file,
                "grpo.reward=judge:ifeval+judge:ifeval",
                "grpo.reward_weights=[1.0]",
            ),
            tmp_path / "w",
        )
    with pytest.raises(AlignError, match="multiple of grpo.num_generations"):
        execute(_rl("grpo", tiny_model, prompt_file, "train.batch_size=6"), tmp_path / "b")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(AlignError, match="needs vLLM, which is not installed"):
            execute(_rl("grpo", tiny_model, prompt_file, "grpo.use_vllm=true"), tmp_path / "v")
