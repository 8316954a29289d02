"""PPO on the shared LoRA backbone: the math against hand-computed values, adapter switching
on one base, learning a simple programmatic reward, and stage=ppo end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose, separable_pairs, tiny_overrides, write_jsonl

from align.rl import losses

# --------------------------------------------------------------------------- math


def test_gae_matches_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after 2 tokens
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: d2 = 1 - 0.1 = 0.9; d1 = 0.9*0.1 - 0.2 = -0.11; A1 = -0.11 + 0.72*0.9 = 0.538
    #        d0 = 0.9*0.2 - 0.5 = -0.32; A0 = -0.32 + 0.72*0.538 = 0.06736
    # row 2: the padded reward 5 and value 7 are ignored: A1 = 2 - 1 = 1; A0 = 0.9*1 - 1 + 0.72*1 = 0.62
    expected = torch.tensor([[0.06736, 0.538, 0.9], [0.62, 1.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.tensor([[0.56736, 0.738, 1.0], [1.62, 2.0, 0.0]]))


def test_clipped_policy_loss_matches_hand_computation():
    old = torch.zeros(1, 4)
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 9.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th token is padding
    loss, stats = losses.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    expected_approxkl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["approxkl"].item() == pytest.approx(expected_approxkl, abs=1e-6)


def test_clipped_value_loss_matches_hand_computation():
    vpred = torch.tensor([[1.0, 0.0, 50.0]])
    old = torch.tensor([[0.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = losses.value_loss(vpred, old, returns, mask, cliprange_value=0.2)
    # token 1: clip(1.0, 0.3, 0.7) = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69; token 2: 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_per_token_kl_rewards_and_whitening():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl1 = losses.per_token_kl(lp, ref, mask, "k1")
    torch.testing.assert_close(kl1, torch.tensor([[0.5, -1.0, 0.0]]))
    kl3 = losses.per_token_kl(lp, ref, mask, "k3")
    r = torch.tensor([math.exp(-0.5), math.exp(1.0)])
    torch.testing.assert_close(kl3[0, :2], (r - 1) - torch.log(r))
    assert (kl3[0, :2] >= 0).all()
    rewards = losses.token_rewards(torch.tensor([2.0]), kl1, mask, kl_coef=0.1)
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]])
    )  # score on the last real token
    w = losses.masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    torch.testing.assert_close(
        w, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-4, rtol=0
    )
    ctl = losses.KLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_samples=10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.102)


# --------------------------------------------------------------------------- the shared backbone


def fake_reward_adapter(model_dir: Path, out: Path) -> Path:
    """A seq-cls LoRA + score head with random weights, saved the way stage=rm saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def ppo_config(model_dir: Path, *extra: str):
    return compose(
        "stage=ppo",
        *tiny_overrides(
            model_dir,
            "ppo.reward=judge:ifeval",
            "ppo.max_new_tokens=12",
            "ppo.missing_eos_penalty=null",
            "ppo.temperature=1.0",
            "train.lr_scheduler=constant",
            *extra,
        ),
    )


PROMPTS = [{"prompt": [{"role": "user", "content": f"Tell me about water {i}."}]} for i in range(32)]


def test_adapters_share_one_base_and_ppo_never_changes_it(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from align import backbone
    from align.rl import ppo, rollout

    rm_dir = fake_reward_adapter(tiny_model, tmp_path / "rm")
    cfg = ppo_config(tiny_model, "train.max_steps=1", "train.lr=1e-2")
    rt = backbone.detect_runtime(cfg)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    models = ppo.build_models(cfg, str(tiny_model), rt, reward_dir=rm_dir)
    assert models.shared and set(models.policy.peft_config) == {"default", "value", "reward"}
    ids = tok("The water is good.", return_tensors="pt")
    x, m = ids["input_ids"], ids["attention_mask"]

    # the reward adapter + saved score head on the causal-LM base == the seq-cls reward model
    seq_cls = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    expected = (
        PeftModel.from_pretrained(seq_cls, rm_dir).eval()(input_ids=x, attention_mask=m).logits.squeeze()
    )
    with torch.no_grad():
        hidden = {}
        for role in ("policy", "value", "reward", "ref"):
            with models.active(role) as model:
                hidden[role] = rollout.hidden_states(model, x, m)
        reward = rollout.last_token_scores(models.score_head, hidden["reward"], m)
        value = rollout.last_token_scores(models.value_head, hidden["value"], m)
    torch.testing.assert_close(reward.squeeze(), expected.detach(), atol=1e-5, rtol=1e-5)
    # value starts as a trainable copy of the reward model; the fresh policy adapter is the base (= reference)
    torch.testing.assert_close(value, reward)
    torch.testing.assert_close(hidden["policy"], hidden["ref"])
    assert not torch.allclose(hidden["policy"], hidden["reward"])

    base_before = {n: p.detach().clone() for n, p in models.policy.named_parameters() if "lora_" not in n}
    reward_before = {n: p.detach().clone() for n, p in models.policy.named_parameters() if ".reward." in n}
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu")
    trainer.train(PROMPTS, seed=0)
    after = dict(models.policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items()), "a base weight changed"
    assert all(torch.equal(after[n], p) for n, p in reward_before.items()), (
        "the frozen reward adapter changed"
    )
    with torch.no_grad():
        outs = {}
        for role in ("policy", "value", "reward", "ref"):
            with models.active(role) as model:
                outs[role] = rollout.hidden_states(model, x, m)
        value_after = rollout.last_token_scores(models.value_head, outs["value"], m)
        reward_after = rollout.last_token_scores(models.score_head, outs["reward"], m)
    torch.testing.assert_close(reward_after, reward)  # frozen
    assert not torch.allclose(value_after, reward)  # value adapter + head trained
    assert not torch.allclose(outs["policy"], outs["ref"])  # policy trained, reference did not move
    torch.testing.assert_close(outs["ref"], hidden["ref"])
    # three outputs from one base: policy, value and reward now all differ
    assert not torch.allclose(outs["policy"], outs["value"]) and not torch.allclose(
        outs["value"], outs["reward"]
    )


def test_score_index_is_where_transformers_pools_a_sequence_classifier():
    from align import rewards

    pad = 0
    ids = torch.tensor([[5, 6, 7, pad, pad], [5, pad, 9, 4, pad], [3, 4, 5, 6, 7]])
    assert rewards.score_index(ids, pad).tolist() == [2, 3, 4]


def test_ppo_scores_a_rollout_where_the_reward_model_was_trained(tiny_model, tmp_path):
    """The shared-backbone reward == the seq-cls reward model on the chat-formatted text, pooled
    by transformers (what TRL's RewardTrainer trains): read after the template's end of turn,
    not at the sampled EOS, where a trained reward model's score is noise (issue 11)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from align import backbone, rewards
    from align.rl import ppo

    rm_dir = fake_reward_adapter(tiny_model, tmp_path / "rm")
    cfg = ppo_config(tiny_model, "train.max_steps=1", "ppo.max_new_tokens=6")
    rt = backbone.detect_runtime(cfg)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    models = ppo.build_models(cfg, str(tiny_model), rt, reward_dir=rm_dir)
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu")
    batch = trainer.make_batch(PROMPTS[:4])

    texts = rewards.reward_texts(tok, batch.ro.prompts, batch.ro.completions)
    turn = tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    end_of_turn = turn.split("x")[-1]
    assert end_of_turn and all(t.endswith(end_of_turn) for t in texts)
    seq_cls = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    seq_cls.config.pad_token_id = tok.pad_token_id
    rm = PeftModel.from_pretrained(seq_cls, rm_dir).eval()
    ids, mask = rewards.encode_right_padded(tok, texts)
    with torch.no_grad():
        expected = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(batch.raw_scores, expected, atol=1e-4, rtol=1e-4)


def test_a_fresh_value_head_starts_at_zero_so_first_advantages_are_the_returns():
    from align.rl import ppo

    # a random head put values of std ~2 (token-to-token differences ~2.7) on SmolLM2's hidden
    # states: ten times a judge's 0..1 score, so GAE's deltas were mostly noise
    head = ppo.ScalarHead(8)
    hidden = torch.randn(2, 5, 8) * 45
    assert torch.equal(head(hidden), torch.zeros(2, 5, 1))
    scores, mask = torch.tensor([1.0, 0.0]), torch.ones(2, 5)
    rewards = losses.token_rewards(scores, torch.zeros(2, 5), mask, 0.05)
    adv, returns = losses.gae(rewards, head(hidden).squeeze(-1), mask, gamma=1.0, lam=1.0)
    # lam=1: every token of a completion gets its sequence's score as the advantage
    assert torch.equal(adv, torch.tensor([[1.0] * 5, [0.0] * 5])) and torch.equal(returns, adv)
    copied = ppo.ScalarHead(8, weight=torch.ones(8))  # from a reward model's score head: copied
    assert torch.equal(copied.weight, torch.ones(1, 8))


def test_training_state_allocated_up_front_steps_like_a_fresh_adamw(tiny_model):
    """Gradients and AdamW moments exist before the first rollout (so they do not fragment the
    first update's heap) and the optimizer then steps exactly as AdamW's lazy init would."""
    from align import backbone
    from align.rl import ppo

    cfg = ppo_config(tiny_model, "train.lr=1e-2", "train.weight_decay=0.1")
    rt = backbone.detect_runtime(cfg)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    models = ppo.build_models(cfg, str(tiny_model), rt)
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu", reward_fn=low_token_reward)
    params = models.trainable
    assert all(q.grad is not None and not q.grad.any() for q in params)
    assert all(len(trainer.optimizer.state[q]) == 3 for q in params)
    clones = [q.detach().clone().requires_grad_(True) for q in params]
    group = trainer.optimizer.param_groups[0]
    fresh = torch.optim.AdamW(clones, lr=group["lr"], weight_decay=group["weight_decay"])
    torch.manual_seed(0)
    for _ in range(3):
        for q, c in zip(params, clones, strict=True):
            g = torch.randn_like(q)
            q.grad.copy_(g)
            c.grad = g.clone()
        trainer.optimizer.step()
        fresh.step()
    for q, c in zip(params, clones, strict=True):
        torch.testing.assert_close(q, c, rtol=0, atol=0)


def test_chunked_logprobs_match_the_models_logits_with_the_same_gradients(tiny_model, monkeypatch):
    """Log-probs taken LOGPROB_CHUNK tokens at a time through the LM head (recomputed in
    backward) equal log_softmax of the model's own logits, values, entropy and gradients."""
    from align import backbone, sampling
    from align.rl import ppo, rollout

    cfg = ppo_config(tiny_model)
    models = ppo.build_models(cfg, str(tiny_model), backbone.detect_runtime(cfg))
    monkeypatch.setattr(sampling, "LOGPROB_CHUNK", 5)  # several chunks, one ragged
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking policy adapter, so LoRA gradients are non-trivial
        for n, q in models.policy.named_parameters():
            if "lora_B" in n and ".default." in n:
                q.normal_(0.0, 0.1)
    ids = torch.randint(3, 200, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded prompt
    models.policy.train()
    results = []
    for fn in (rollout.token_logprobs, rollout._logprobs_from_model_logits):
        models.policy.zero_grad(set_to_none=True)
        with models.active("policy") as model:
            lp, ent = fn(model, ids, mask, 6, 0.7, True)
        (lp * torch.linspace(-1, 1, 6)).sum().backward()
        grads = {n: q.grad.clone() for n, q in models.policy.named_parameters() if q.grad is not None}
        results.append((lp.detach(), ent, grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    assert lp_a.shape == (3, 6) and not ent_a.requires_grad
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=1e-5, rtol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-5, rtol=1e-4)


def low_token_reward(prompts, completions, completion_ids, **columns):
    """Fraction of completion tokens among the 64 lowest ids (~1/8 of the tiny vocabulary)."""
    return [sum(1 for t in ids if t < 64) / max(len(ids), 1) for ids in completion_ids]


def test_ppo_raises_a_programmatic_reward_with_finite_kl(tiny_model):
    from align import backbone
    from align.rl import ppo

    # 32 prompts a step for 40 steps: with 16 for 30 the reward took off in only about half of
    # the seeds, with model.generate and align.sampling alike (measured on 6-10 seeds each);
    # with 32 x 40 it rose by 0.61-0.73 on all 4 seeds tried
    cfg = ppo_config(
        tiny_model,
        "train.max_steps=40",
        "train.lr=2e-3",
        "train.batch_size=32",
        "ppo.ppo_epochs=4",
        "ppo.kl_coef=0.01",
        "ppo.max_new_tokens=16",
    )
    rt = backbone.detect_runtime(cfg)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    torch.manual_seed(0)
    models = ppo.build_models(cfg, str(tiny_model), rt)
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu", reward_fn=low_token_reward)
    before = trainer.evaluate(PROMPTS, seed=1)["score"]
    history = trainer.train(PROMPTS, seed=0)
    after = trainer.evaluate(PROMPTS, seed=1)["score"]
    ref = trainer.evaluate(PROMPTS, role="ref", seed=1)["score"]
    assert ref == pytest.approx(before)  # the reference is the untouched start
    assert after > before + 0.15, (before, after)
    kls = [h["objective/kl"] for h in history]
    assert all(math.isfinite(k) for k in kls) and kls[-1] > 0
    for key in (
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/entropy",
        "policy/clipfrac",
        "policy/approxkl",
        "loss/policy",
        "loss/value",
        "val/ratio",
        "val/completion_length",
    ):
        assert math.isfinite(history[-1][key]), key


def test_stage_ppo_with_judge_logs_to_wandb_and_leaves_an_artifact(tiny_model, tmp_path, monkeypatch):
    from align import data as data_module
    from align.stages import execute
    from align.tracking import read_offline_run

    def no_dataset(rows):  # PPO only iterates its prompts: no disk-backed Dataset (nor `datasets`)
        raise AssertionError("stage=ppo built a datasets.Dataset")

    monkeypatch.setattr(data_module, "cached_dataset", no_dataset)

    rows = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": f"Tell me about rain {i}. Your entire response must be in lowercase.",
                }
            ],
            "constraints": [{"type": "lowercase"}],
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = ppo_config(
        tiny_model,
        f"data.train={data}",
        f"data.eval={data}",
        "data.max_eval_rows=4",
        "train.max_steps=2",
        "train.batch_size=4",
        "tracking=offline",
        "ppo.sample_every=1",
    )
    metrics = execute(cfg, tmp_path / "ppo")
    manifest = json.loads((tmp_path / "ppo" / "artifact.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["data"]["reward"] == "judge:ifeval"
    assert manifest["data"]["reference"].startswith("base model")
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= metrics["eval/score"] <= 1.0 and 0.0 <= metrics["eval/ref_score"] <= 1.0
    run_dir = next((tmp_path / "ppo" / "wandb").glob("offline-run-*"))
    history = read_offline_run(run_dir)["history"]
    logged = set().union(*history)
    assert {"objective/kl", "objective/scores", "policy/entropy", "loss/value", "val/ratio"} <= logged
    assert any(k.startswith("samples") for k in logged)


def nan_reward(prompts, completions, completion_ids, **columns):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_non_finite_ppo_update_stops_or_is_skipped(tiny_model, on_nan):
    from align import backbone
    from align.errors import AlignError
    from align.rl import ppo

    cfg = ppo_config(tiny_model, "train.max_steps=2", "train.batch_size=4", f"train.on_nan={on_nan}")
    rt = backbone.detect_runtime(cfg)
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    torch.manual_seed(0)
    models = ppo.build_models(cfg, str(tiny_model), rt)
    before = [p.detach().clone() for p in models.trainable]
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu", reward_fn=nan_reward)
    if on_nan == "stop":
        with pytest.raises(AlignError, match="non-finite .* at PPO step 1"):
            trainer.train(PROMPTS, seed=0)
    else:
        history = trainer.train(PROMPTS, seed=0)
        assert len(history) == 2 and history[-1]["train/skipped_nonfinite_updates"] > 0
    # no NaN reached the weights: every bad update was dropped
    assert all(torch.equal(a, b) for a, b in zip(before, models.trainable, strict=True))


def test_fast_rollout_gives_generates_tokens_and_the_first_ratio_is_one(tiny_model):
    """The rollout through align.sampling (adapter merged, finished rows dropped) samples what
    model.generate samples (top_k=1 makes both deterministic), and the update's first
    log-probs equal the rollout's: ratio 1, approx-KL 0."""
    from align import backbone
    from align.rl import ppo, rollout

    # one epoch of one minibatch: every ratio is taken before the first optimizer step
    cfg = ppo_config(
        tiny_model, "ppo.top_k=1", "train.batch_size=8", "ppo.ppo_epochs=1", "ppo.num_mini_batches=1"
    )
    tok = backbone.load_tokenizer(str(tiny_model), cfg.model)
    torch.manual_seed(0)
    models = ppo.build_models(cfg, str(tiny_model), backbone.detect_runtime(cfg))
    with torch.no_grad():  # a trained-looking policy adapter: merging it changes the weights
        for n, q in models.policy.named_parameters():
            if "lora_B" in n and ".default." in n:
                q.normal_(0.0, 0.1)
    trainer = ppo.PPOTrainer(cfg, models, tok, "cpu", reward_fn=low_token_reward)
    prompts = [r["prompt"] for r in PROMPTS[:8]]
    with models.active("policy") as model:
        model.eval()
        ro = rollout.generate(model, tok, prompts, cfg.ppo, "cpu", trainer.stop_ids)
        with torch.no_grad():
            hf = model.generate(
                input_ids=ro.prompt_ids,
                attention_mask=ro.prompt_mask,
                do_sample=False,
                max_new_tokens=cfg.ppo.max_new_tokens,
                eos_token_id=trainer.stop_ids,
                pad_token_id=tok.pad_token_id,
            )[:, ro.prompt_ids.size(1) :]
    C = ro.completion_ids.size(1)
    assert torch.equal(ro.completion_ids, torch.where(ro.mask.bool(), hf[:, :C], tok.pad_token_id))
    batch = trainer.make_batch(PROMPTS[:8])
    stats = trainer.update(batch)
    assert stats["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(stats["policy/approxkl"]) < 1e-9


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_a_reward_model_scores_at_the_precision_of_the_run(tiny_model, tmp_path, autocast):
    """RewardModel (GRPO/RLOO's rm: reward, eval.reward) scores under the run's bf16 autocast,
    as it was trained, and in fp32 without it."""
    from align import rewards
    from align.stages import execute

    pairs = separable_pairs(tmp_path / "pairs.jsonl", ["water", "bees"], 8, 0)
    rm_args = [f"data.train={pairs}", "data.eval_fraction=0", "train.max_steps=1"]
    execute(compose("stage=rm", *tiny_overrides(tiny_model, *rm_args)), tmp_path / "rm")
    rm = rewards.RewardModel(tmp_path / "rm", ppo_config(tiny_model, f"train.autocast={autocast}"))
    seen = []
    forward = rm.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(*args, **kwargs)

    rm.model.forward = spy
    scores = rm(["Tell me about bees."] * 3, ["Bees make honey.", "No.", "Water."])
    assert len(scores) == 3 and all(isinstance(x, float) for x in scores)
    assert seen and all(d is (torch.bfloat16 if autocast == "bf16" else None) for d in seen), seen
