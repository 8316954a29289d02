"""The fine-tuning methods of issue 13 on the tiny model: layer freezing (exact parameters, the rest
bit-identical), prefix / prompt tuning and IA3 (loss falls, reload equals the trained model), eval,
export, dpo.init, and the combinations that must fail before a model loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, separable_pairs, tiny_overrides

from align import backbone, evaluation, sampling
from align.errors import AlignError
from align.stages import execute

KINDS = ["freeze", "prefix", "prompt", "ia3"]
# lr per kind: a few virtual tokens or scaling vectors need a larger step than a block's weights
LR = {"freeze": "1e-2", "prefix": "3e-2", "prompt": "1e-1", "ia3": "5e-2"}


def _ids(tok, text="Tell me about water and bees."):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


# --------------------------------------------------------------------------- layer freezing


def test_freeze_trains_exactly_the_named_parameters_and_the_rest_stay_bit_identical(tiny_model):
    cfg = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "adapter=freeze", "adapter.train_layers=1", "adapter.train_head=true"),
    )
    bb = backbone.build(cfg)
    model = bb.model
    assert bb.peft_config is None
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    top = [n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")]
    assert trained == set(top) | {"model.norm.weight", "lm_head.weight"}
    # count them: every weight of the top block (4 attention + 3 MLP projections, 2 norms), the final
    # norm and the LM head of the 2-layer, hidden-64 tiny Llama
    h, inter, vocab = 64, 128, model.config.vocab_size
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    block = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h
    expected = block + h + vocab * h
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(model.get_parameter(n).numel() for n in trained) == expected

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(bb.tokenizer)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} changed but is frozen"


def test_freeze_without_the_head_and_with_a_classification_head(tiny_model):
    cfg = compose("stage=sft", *tiny_overrides(tiny_model, "adapter=freeze", "adapter.train_layers=2"))
    model = backbone.build(cfg).model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trained and "model.embed_tokens.weight" not in trained
    assert all(n.startswith(("model.layers.", "model.norm.")) for n in trained)
    rm = backbone.build(
        compose("stage=rm", *tiny_overrides(tiny_model, "adapter=freeze", "adapter.train_layers=1")),
        task="seq_cls",
    ).model
    trained = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and not any(n.startswith("model.layers.0.") for n in trained)


# --------------------------------------------------------------------------- every kind trains and reloads


@pytest.fixture(scope="module")
def sft_runs(tiny_model, tmp_path_factory):
    """One short SFT run per kind, and the model object each run saved (to compare reloads with)."""
    out = {}
    for kind in KINDS:
        saved = {}
        real = backbone.save_adapter

        def keep(model, tokenizer, out_dir, _saved=saved, _real=real):
            _saved["model"] = model
            _real(model, tokenizer, out_dir)

        backbone.save_adapter = keep
        try:
            run_dir = tmp_path_factory.mktemp(f"sft-{kind}")
            cfg = compose(
                "stage=sft",
                *tiny_overrides(
                    tiny_model,
                    "data=tiny",
                    f"adapter={kind}",
                    "adapter.num_virtual_tokens=8",
                    "train.max_steps=16",
                    f"train.lr={LR[kind]}",
                    "train.batch_size=4",
                ),
            )
            metrics = execute(cfg, run_dir)
        finally:
            backbone.save_adapter = real
        out[kind] = (run_dir, metrics, saved["model"])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_and_reloads_from_its_artifact_with_equal_outputs(tiny_model, sft_runs, kind):
    run_dir, metrics, trained = sft_runs[kind]
    assert metrics["train/loss"] < metrics["train/first_loss"], metrics
    manifest = json.loads((run_dir / "artifact.json").read_text())
    assert manifest["adapter"]["kind"] == kind
    assert manifest["adapter"]["trainable_params"] == metrics["model/trainable_params"] > 0
    assert manifest["adapter"]["size_bytes"] > 0
    if kind == "freeze":
        assert manifest["adapter"]["train_layers"] == 2
        assert (run_dir / "adapter" / backbone.FREEZE_WEIGHTS).is_file()
    if kind in ("prefix", "prompt"):
        assert manifest["adapter"]["num_virtual_tokens"] == 8
    cfg = compose(
        "stage=eval", *tiny_overrides(tiny_model, f"adapter={kind}", "adapter.num_virtual_tokens=8")
    )
    model, tok, _ = backbone.load_trained(cfg, run_dir / "adapter")
    # what trained is what reloads, bit for bit (the Trainer's model may run under bf16 autocast, so
    # the weights are compared, and the reload's outputs against the export's in the test below)
    assert _trained_state(model, kind).keys() == _trained_state(trained, kind).keys()
    for k, v in _trained_state(trained, kind).items():
        assert torch.equal(_trained_state(model, kind)[k].to(v.device), v), k
    base = backbone.load_base_model(str(tiny_model), cfg, backbone.detect_runtime(cfg))
    ids = _ids(tok)
    with torch.no_grad():
        got = model(input_ids=ids).logits[:, -ids.size(1) :]
        plain = base(input_ids=ids).logits
    assert not torch.allclose(got, plain, atol=1e-3)  # the method really changed the model


def _trained_state(model, kind) -> dict[str, torch.Tensor]:
    """The tensors the method trains: the freeze plan's, or the peft adapter's."""
    if kind == "freeze":
        params = dict(model.named_parameters())
        return {n: params[n].detach() for n in backbone.freeze_plan(model, 2, False)}
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompt_learning_sampling_runs_through_peft_and_its_logprobs_agree(tiny_model, sft_runs, kind):
    """align's fast decoder would bypass the virtual tokens; prefix/prompt models sample through peft's
    generate, and the greedy log-probs it returns are those a forward pass gives the same tokens."""
    run_dir = sft_runs[kind][0]
    cfg = compose("stage=eval", *tiny_overrides(tiny_model, f"adapter={kind}"))
    model, tok, _ = backbone.load_trained(cfg, run_dir / "adapter")
    assert backbone.is_prompt_learning(model)
    prompts = [tok("Tell me about water.", add_special_tokens=False)["input_ids"], [5, 6, 7, 8, 9, 10]]
    done = sampling.sample(model, prompts, sampling.SamplingParams(max_new_tokens=6), stop=[0], pad_id=0)
    lps = sampling.completion_logprobs(model, [(c.prompt_ids, c.ids) for c in done])
    for c, lp in zip(done, lps, strict=True):
        assert len(c.ids) >= 1 and c.logprobs is not None
        assert lp == pytest.approx(c.logprobs, abs=1e-4)
    with model.disable_adapter():  # the baseline: no virtual tokens, the fast path
        assert not backbone.is_prompt_learning(model)
        base_done = sampling.sample(
            model, prompts, sampling.SamplingParams(max_new_tokens=6), stop=[0], pad_id=0
        )
    assert [c.ids for c in done] != [c.ids for c in base_done]


@pytest.mark.parametrize("kind", KINDS)
def test_stage_eval_and_export_load_every_kind(tiny_model, sft_runs, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = sft_runs[kind][0]
    cfg = compose(
        "stage=eval",
        *tiny_overrides(tiny_model, f"eval.model={run_dir}", "eval.max_prompts=3", "eval.max_pairs=4"),
        "eval.max_new_tokens=8",
    )
    m = execute(cfg, tmp_path / "eval")
    assert m["eval/kl/token"] != 0.0  # the tuned model differs from the base it is compared with
    assert "eval/base/pref/accuracy" in m

    execute(compose("stage=export", "tracking=disabled", f"export.from={run_dir}"), tmp_path / "export")
    out = tmp_path / "export" / "model"
    ecfg = compose("stage=eval", *tiny_overrides(tiny_model))
    ref, tok, _ = backbone.load_trained(ecfg, run_dir / "adapter")
    ids = _ids(tok)
    with torch.no_grad():
        want = ref(input_ids=ids).logits[:, -ids.size(1) :]
    if kind in ("prefix", "prompt"):  # not mergeable: the adapter and a loader note
        from peft import PeftModel

        card = (out / "README.md").read_text()
        assert "How to load it" in card and "PeftModel.from_pretrained" in card
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        loaded = PeftModel.from_pretrained(base, str(out))
    else:  # merged: a standalone model
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits[:, -ids.size(1) :]
    assert torch.allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------- other stages and chaining


@pytest.mark.parametrize(
    "kind,stage",
    [
        ("freeze", "dpo"),
        ("prefix", "dpo"),
        ("prompt", "dpo"),
        ("prompt", "classify"),
        ("ia3", "rm"),
        ("ia3", "classify"),
        # the other preference stages, as dpo (orpo/simpo compare logits with labels by position:
        # the soft prompt's positions must not shift them)
        ("freeze", "kto"),
        ("prefix", "kto"),
        ("prompt", "orpo"),
        ("prompt", "simpo"),
        ("ia3", "simpo"),
    ],
)
def test_new_kinds_run_the_preference_stages_rm_and_classify(tiny_model, tmp_path, kind, stage):
    pairs = separable_pairs(tmp_path / "pairs.jsonl", ["water", "bees", "music"], 32, 0)
    extra = [f"adapter={kind}", "train.max_steps=12", "train.batch_size=4", f"train.lr={LR[kind]}"]
    extra += (
        [f"data.train={pairs}"] if stage != "classify" else ["data.max_train_rows=32", "data.max_eval_rows=8"]
    )
    m = execute(compose(f"stage={stage}", *tiny_overrides(tiny_model, *extra)), tmp_path / "run")
    assert m["train/loss"] < m["train/first_loss"]
    assert json.loads((tmp_path / "run" / "artifact.json").read_text())["adapter"]["kind"] == kind


# the reference is the SFT model: at the first step policy == reference, so DPO's loss is ln 2 and
# KTO's 1/2 (rewards and KL 0); continuing with another method is refused
@pytest.mark.parametrize(
    "stage, first_loss, other",
    [("dpo", 0.6931, "lora"), ("kto", 0.5, "ia3")],
)
def test_preference_stage_continues_a_freeze_sft_run_with_it_as_reference(
    tiny_model, sft_runs, tmp_path, stage, first_loss, other
):
    run_dir = sft_runs["freeze"][0]
    pairs = separable_pairs(tmp_path / "pairs.jsonl", ["water", "bees"], 16, 0)
    over = [f"data.train={pairs}", "train.max_steps=2", "train.batch_size=4", f"{stage}.init={run_dir}"]
    m = execute(
        compose(f"stage={stage}", *tiny_overrides(tiny_model, "adapter=freeze", *over)), tmp_path / stage
    )
    assert m["train/first_loss"] == pytest.approx(first_loss, abs=1e-3)
    with pytest.raises(
        AlignError, match=f"{stage}.init=.*was trained with adapter=freeze.*set adapter=freeze"
    ):
        execute(
            compose(f"stage={stage}", *tiny_overrides(tiny_model, f"adapter={other}", *over)), tmp_path / "x"
        )


# --------------------------------------------------------------------------- impossible combinations


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["stage=sft", "adapter=freeze", "adapter.bits=4"],
            "adapter=freeze with adapter.bits=4.*adapter=qlora",
        ),
        (
            ["stage=sft", "adapter=prompt", "adapter.bits=4"],
            "adapter=prompt with adapter.bits=4.*adapter=qlora",
        ),
        (
            ["stage=ppo", "adapter=prefix", "ppo.reward=judge:ifeval", "train.max_steps=1"],
            "PPO.*use adapter=lora",
        ),
        (["stage=rlhf", "adapter=ia3"], "adapter=ia3 with stage=rlhf.*adapter=lora"),
        (["stage=grpo", "adapter=prompt"], "adapter=prompt with stage=grpo is not supported.*adapter=lora"),
        (["stage=rm", "adapter=prefix"], "adapter=prefix with stage=rm.*adapter=prompt"),
        (["stage=rm", "adapter=prompt"], "adapter=prompt with stage=rm.*adapter=ia3"),
        (["stage=sft", "adapter=prefix", "train.packing=true"], "train.packing=true.*packing=false"),
        (["stage=classify", "adapter=prompt", "classify.packing=true"], "classify.packing=true"),
        (["stage=sft", "adapter=freeze", "adapter.train_layers=0"], "adapter.train_layers=0"),
        (["stage=sft", "adapter=freeze", "adapter.train_layers=3"], "train_layers=3.*has 2 decoder blocks"),
        (["stage=sft", "adapter=prompt", "adapter.num_virtual_tokens=200"], "num_virtual_tokens=200"),
    ],
)
def test_bad_combinations_fail_before_a_model_is_loaded(tiny_model, tmp_path, monkeypatch, overrides, match):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(backbone, "load_base_model", no_load)
    cfg = compose(*overrides[:1], *tiny_overrides(tiny_model, "data=tiny", *overrides[1:]))
    with pytest.raises(AlignError, match=match):
        execute(cfg, tmp_path / "run")


def test_ppo_refuses_a_prefix_policy_before_loading(tiny_model, sft_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "load_base_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    cfg = compose(
        "stage=ppo",
        *tiny_overrides(
            tiny_model, f"ppo.policy={sft_runs['prefix'][0]}", "ppo.reward=judge:ifeval", "train.max_steps=1"
        ),
    )
    with pytest.raises(AlignError, match="ppo.policy=.*adapter=prefix.*adapter=lora"):
        execute(cfg, tmp_path / "ppo")


def test_eval_loader_names_the_kind(tiny_model, sft_runs):
    cfg = compose("stage=eval", *tiny_overrides(tiny_model))
    loaded = evaluation.load(cfg, str(sft_runs["freeze"][0]))
    assert loaded.baseline is not None and loaded.baseline.model is not loaded.model.model
