"""stage=eval: metric definitions on known outputs, KL, the report files, and a real
preference-accuracy gain after a short DPO run (tiny model)."""

from __future__ import annotations

import json

import pytest
from conftest import compose, separable_pairs, tiny_overrides, write_jsonl

from align import evaluation
from align.errors import AlignError
from align.stages import execute

# --------------------------------------------------------------------------- metric definitions


def test_ifeval_metrics_prompt_and_instruction_level_and_per_type():
    constraints = [
        [{"type": "lowercase"}, {"type": "max_words", "n": 5}],  # both pass
        json.dumps([{"type": "lowercase"}, {"type": "no_commas"}]),  # JSON string; 1 of 2 passes
        [{"type": "title"}],  # fails
    ]
    completions = ["hello there friend", "hello, there", "No title here."]
    m, per_type = evaluation.ifeval_metrics(constraints, completions)
    assert m["ifeval/prompt_accuracy"] == pytest.approx(1 / 3)
    assert m["ifeval/instruction_accuracy"] == pytest.approx(3 / 5)
    assert m["ifeval/prompts"] == 3 and m["ifeval/instructions"] == 5
    assert per_type["lowercase"] == {
        "instructions": 2,
        "instruction_accuracy": 1.0,
        "prompts": 2,
        "prompt_accuracy": 0.5,  # it passed twice, but only one of its prompts passed entirely
    }
    assert per_type["max_words"]["instruction_accuracy"] == 1.0
    assert per_type["no_commas"]["instruction_accuracy"] == 0.0
    assert per_type["title"] == {
        "instructions": 1,
        "instruction_accuracy": 0.0,
        "prompts": 1,
        "prompt_accuracy": 0.0,
    }


def test_preference_win_rate_kl_and_length_definitions():
    p = evaluation.preference_metrics([-1.0, -5.0, -2.0, -3.0], [-2.0, -4.0, -2.0, -9.0])
    assert p["pref/accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    assert p["pref/margin"] == pytest.approx((1 - 1 + 0 + 6) / 4)
    assert evaluation.win_rate([1, 0, 0.5], [0, 1, 0.5]) == pytest.approx(0.5)
    kl = evaluation.kl_metrics([[-1.0, -1.0], [-0.5]], [[-2.0, -1.0], [-1.5]])
    assert kl["kl/token"] == pytest.approx((1 + 0 + 1) / 3)  # pooled over the 3 generated tokens
    assert kl["kl/sequence"] == pytest.approx((1 + 1) / 2)
    gens = [
        evaluation.Generation("a b c", n_tokens=4),
        evaluation.Generation("a", n_tokens=2, truncated=True),
    ]
    assert evaluation.length_metrics(gens) == {
        "length/tokens": 3.0,
        "length/words": 2.0,
        "length/truncated": 0.5,
    }


def test_kl_of_a_model_against_itself_is_zero(tiny_model):
    """A fresh LoRA adapter (B = 0) is the base: the KL on its own greedy completions is 0,
    while a perturbed adapter's is not; both through the adapter-disabled baseline path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.backbone import ensure_chat_template, load_tokenizer

    cfg = compose("stage=eval", *tiny_overrides(tiny_model))
    tok = load_tokenizer(str(tiny_model), cfg.model)
    ensure_chat_template(tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    prompts = [[{"role": "user", "content": f"Tell me about {w}."}] for w in ("water", "bees", "snow")]
    me, ref = evaluation.Subject("model", model), evaluation.Subject("baseline", model, adapter=None)

    def kl() -> dict:
        with me.active() as m:
            gens = evaluation.generate(m, tok, prompts, max_new_tokens=6, batch_size=2)
        seqs = [(g.prompt_ids, g.ids) for g in gens]
        with me.active() as m:
            a = evaluation.token_logps(m, seqs, batch_size=2, device="cpu")
        with ref.active() as m:
            b = evaluation.token_logps(m, seqs, batch_size=2, device="cpu")
        assert sum(map(len, a)) > 0
        return evaluation.kl_metrics(a, b)

    assert kl() == {"kl/token": pytest.approx(0.0, abs=1e-6), "kl/sequence": pytest.approx(0.0, abs=1e-5)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    # greedy completions of the model itself: they are likelier under it than under the base
    assert kl()["kl/token"] > 0.01


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def dpo_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-dpo")
    train = separable_pairs(d / "train.jsonl", ["water", "bees", "music", "snow", "rain", "stars"], 120, 0)
    test = separable_pairs(d / "test.jsonl", ["ocean", "mountain", "city", "moon"], 24, 1)
    cfg = compose(
        "stage=dpo",
        *tiny_overrides(
            tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=8", "train.lr=3e-3"
        ),
    )
    execute(cfg, d / "run")
    return d / "run", test


EVAL_FAST = ("eval.max_prompts=6", "eval.max_new_tokens=6", "eval.batch_size=6", "eval.samples_to_log=3")


def test_eval_of_a_dpo_run_reports_higher_preference_accuracy_than_base(tiny_model, dpo_run, tmp_path):
    run_dir, test_pairs = dpo_run
    cfg = compose(
        "stage=eval",
        *tiny_overrides(tiny_model, f"eval.model={run_dir}", f"eval.pairs={test_pairs}", *EVAL_FAST),
    )
    m = execute(cfg, tmp_path / "eval")
    # DPO learnt the held-out preference; the base (adapters disabled, same weights) did not
    assert m["eval/pref/accuracy"] > m["eval/base/pref/accuracy"]
    assert m["eval/pref/accuracy"] >= 0.9
    assert m["eval/pref/margin"] > m["eval/base/pref/margin"]
    assert m["eval/delta/pref/accuracy"] == pytest.approx(
        m["eval/pref/accuracy"] - m["eval/base/pref/accuracy"]
    )
    # implicit DPO reward against its reference (the base), with the run's beta
    assert m["eval/dpo/reward_accuracy"] >= 0.9 and m["eval/dpo/reward_margin"] > 0
    assert m["eval/dpo/beta"] == pytest.approx(0.1)
    # the trained adapter moved the policy away from the base, the base is at KL 0 from itself
    assert m["eval/kl/token"] > 0 and m["eval/base/kl/token"] == 0.0
    assert m["eval/ifeval/prompts"] == 6 and 0 <= m["eval/ifeval/prompt_accuracy"] <= 1
    assert 0 < m["eval/length/tokens"] <= 6

    out = tmp_path / "eval"
    report = json.loads((out / "eval.json").read_text())
    assert {
        "format",
        "model",
        "baseline",
        "settings",
        "data",
        "metrics",
        "per_type",
        "samples",
        "time",
        "flat",
    } <= set(report)
    assert report["model"]["stage"] == "dpo" and report["baseline"] == "base"
    assert set(report["metrics"]) == {"model", "baseline", "delta"}
    assert report["per_type"]["model"] and report["per_type"]["baseline"]
    assert len(report["samples"]) == 3
    assert {"id", "prompt", "constraints", "baseline", "baseline_pass", "model", "model_pass"} <= set(
        report["samples"][0]
    )
    md = (out / "report.md").read_text()
    assert "| metric | baseline | model | difference |" in md and "| pref/accuracy |" in md
    assert "## Per instruction type" in md and "## Samples" in md
    assert "![per-instruction-type accuracy](eval.png)" in md  # model next to the base, drawn
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["chart"] == "eval.png"
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["stage"] == "eval" and manifest["adapter"]["path"] is None
    assert not (out / "adapter").exists()
    assert manifest["metrics"]["eval/pref/accuracy"] == m["eval/pref/accuracy"]


def test_several_models_one_table_one_row_each(tiny_model, dpo_run, tmp_path, monkeypatch):
    """eval.model=[base,<run>,<run>]: every model on the same prompts, one row each, the
    difference to the base with its noise band, one chart; each model loaded once."""
    import math

    from align import backbone

    run_dir, test_pairs = dpo_run
    loads = []
    real_load = backbone.load_base_model

    def counting(path, *a, **kw):
        loads.append(path)
        return real_load(path, *a, **kw)

    cfg = compose(
        "stage=eval",
        *tiny_overrides(
            tiny_model, f"eval.model=[base,{run_dir},{run_dir}]", f"eval.pairs={test_pairs}", *EVAL_FAST
        ),
    )
    monkeypatch.setattr(backbone, "load_base_model", counting)
    m = execute(cfg, tmp_path / "eval")
    assert len(loads) == 3  # base once, the run twice (no second base copy for a baseline)
    out = tmp_path / "eval"
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "align-eval-models/1"
    labels = [r["label"] for r in report["models"]]
    assert labels == ["base", "dpo:run", "dpo:run#2"] and report["baseline"] == "base"
    for r in report["models"]:
        assert r["metrics"]["ifeval/prompts"] == 6 and r["metrics"]["pref/pairs"] == 24
    base, dpo, dpo2 = report["models"]
    assert base["vs_base"] is None and dpo["metrics"] == dpo2["metrics"]  # same run, same numbers
    assert dpo["metrics"]["pref/accuracy"] > base["metrics"]["pref/accuracy"]
    v = dpo["vs_base"]
    pa, pb = dpo["metrics"]["ifeval/prompt_accuracy"], base["metrics"]["ifeval/prompt_accuracy"]
    assert v["delta/ifeval/prompt_accuracy"] == pytest.approx(pa - pb)
    assert v["band/ifeval/prompt_accuracy"] == pytest.approx(
        1.96 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / 6)
    )
    assert report["noise"]["worst_case_prompts"] == pytest.approx(1.96 * math.sqrt(0.5 / 6))
    # per-item outcomes for paired comparisons between any two rows: they reproduce the metrics
    for r in report["models"]:
        assert len(r["passed"]) == 6 and sum(r["passed"]) / 6 == pytest.approx(
            r["metrics"]["ifeval/prompt_accuracy"]
        )
        assert len(r["pair_wins"]) == 24 and sum(r["pair_wins"]) / 24 == pytest.approx(
            r["metrics"]["pref/accuracy"]
        )
    assert m["eval/dpo:run/pref/accuracy"] == dpo["metrics"]["pref/accuracy"]
    # report.md: one table row per model, and the chart next to it
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "`" in ln]
    assert [ln.split(" | ")[0][2:] for ln in rows] == labels
    assert "±95%" in md and "1.96 × sqrt(p_a(1−p_a)/n + p_b(1−p_b)/n)" in md
    assert f"dpo:run: {dpo['model']['precision']}" in md  # each row's precision is stated
    assert "![per-instruction-type accuracy](eval.png)" in md
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cols, table = evaluation.models_table(report)
    assert len(table) == 3 and cols[:2] == ["model", "spec"]
    # the forgetting check, each model against its base (none for the base itself: nothing to compare)
    assert base["forgetting"] is None and not any(k.startswith("forgetting/") for k in base["metrics"])
    assert dpo["metrics"]["forgetting/kl_base_tuned"] > 0 and dpo["forgetting"]["verdict"]
    assert m["eval/dpo:run/forgetting/ppl_ratio"] == dpo["metrics"]["forgetting/ppl_ratio"]
    assert "## Forgetting" in md and dpo["forgetting"]["verdict"] in md


def test_eval_model_list_is_validated(tiny_model, tmp_path):
    with pytest.raises(AlignError, match="eval.model is empty"):
        execute(compose("stage=eval", *tiny_overrides(tiny_model, "eval.model=[]")), tmp_path / "e")


def test_judged_accuracy_and_win_rate_on_fixed_completions(tiny_model, dpo_run, tmp_path, monkeypatch):
    """A stub generator: the model answers in lowercase, the baseline in capitals; the judges
    decide the accuracies and the judge-based win-rate exactly."""
    run_dir, _ = dpo_run
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "a", "prompt": "Say hi.", "constraints": [{"type": "lowercase"}]},
            {"id": "b", "prompt": "Say bye.", "constraints": [{"type": "lowercase"}, {"type": "no_commas"}]},
        ],
    )
    real = evaluation.generate

    def stub(model, tokenizer, prompts, **kw):
        gens = real(model, tokenizer, prompts, **kw)  # real ids (for KL), fixed texts for the judges
        text = "hello, world" if kw["desc"].endswith("model") else "HELLO, WORLD"
        for g in gens:
            g.text = text
        return gens

    monkeypatch.setattr(evaluation, "generate", stub)
    cfg = compose(
        "stage=eval",
        *tiny_overrides(tiny_model, f"eval.model={run_dir}", f"eval.prompts={prompts}", "eval.max_pairs=0"),
        "eval.max_new_tokens=4",
    )
    m = execute(cfg, tmp_path / "eval")
    assert m["eval/ifeval/prompt_accuracy"] == 0.5  # b fails no_commas
    assert m["eval/ifeval/instruction_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/base/ifeval/prompt_accuracy"] == 0.0 and m["eval/base/ifeval/instruction_accuracy"] == 0.0
    assert m["eval/ifeval/type/lowercase"] == 1.0 and m["eval/ifeval/type/no_commas"] == 0.0
    assert m["eval/win_rate/judge"] == 1.0  # better on both prompts
    assert "eval/pref/accuracy" not in m  # eval.max_pairs=0 skips the pairs
    samples = json.loads((tmp_path / "eval" / "eval.json").read_text())["samples"]
    assert [(s["model_pass"], s["baseline_pass"]) for s in samples] == [(True, False), (False, False)]


def test_train_eval_at_end_writes_the_report_into_the_training_run(tiny_model, tmp_path):
    cfg = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=2", "train.eval_at_end=true"),
        "eval.max_prompts=2",
        "eval.max_pairs=4",
        "eval.max_new_tokens=4",
    )
    m = execute(cfg, tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter").is_dir()
    report = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert report["model"]["stage"] == "sft" and report["data"]["prompt_rows"] == 2
    assert (tmp_path / "sft" / "report.md").is_file()
    assert m["eval/ifeval/prompts"] == 2 and m["eval/pref/pairs"] == 4 and "train/loss" in m
    # the run's own records hold the report's numbers too, not only the return value
    for name in ("metrics.json", "artifact.json"):
        saved = json.loads((tmp_path / "sft" / name).read_text())
        saved = saved["metrics"] if name == "artifact.json" else saved
        assert saved["eval/ifeval/prompts"] == 2 and "train/loss" in saved, name


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_eval_runs_at_the_precision_of_the_run(tiny_model, tmp_path, monkeypatch, autocast):
    """Generation, KL and pair scoring of stage=eval run under train.autocast, as training does
    (bf16 forced here, emulated where the CPU lacks it, so the test holds on every CPU), and
    eval.json / report.md say which precision the figures were measured at."""
    import torch

    from align import sampling

    seen = []

    def recording(name: str):
        real = getattr(sampling, name)

        def call(*a, **k):
            seen.append((name, sampling.ambient_autocast("cpu", k.get("autocast"))))
            return real(*a, **k)

        monkeypatch.setattr(sampling, name, call)

    recording("sample")
    recording("completion_logprobs")
    run = tmp_path / "sft"
    execute(compose("stage=sft", *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=1")), run)
    cfg = compose(
        "stage=eval",
        *tiny_overrides(tiny_model, f"eval.model={run}", f"train.autocast={autocast}"),
        "eval.max_prompts=2",
        "eval.max_pairs=2",
        "eval.max_new_tokens=4",
        "eval.max_general=2",
    )
    seen.clear()
    execute(cfg, tmp_path / "eval")
    want = torch.bfloat16 if autocast == "bf16" else None
    kinds = {k for k, _ in seen}
    assert kinds == {"sample", "completion_logprobs"} and all(d is want for _, d in seen), seen
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    label = "bf16 autocast" if autocast == "bf16" else "no autocast (the weights' dtype)"
    assert report["model"]["precision"] == label
    assert f"- precision: {label}" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_refuses_a_reward_model_run_and_bad_keys(tiny_model, tmp_path):
    fake = tmp_path / "rm"
    fake.mkdir()
    (fake / "artifact.json").write_text(
        json.dumps(
            {
                "format": "align-artifact/1",
                "stage": "rm",
                "base_model": {"name_or_path": str(tiny_model)},
                "adapter": {},
            }
        )
    )
    with pytest.raises(AlignError, match="not a policy.*eval.reward"):
        execute(compose("stage=eval", *tiny_overrides(tiny_model, f"eval.model={fake}")), tmp_path / "e1")
    with pytest.raises(AlignError, match="eval.baseline"):
        execute(compose("stage=eval", *tiny_overrides(tiny_model, "eval.baseline=bogus")), tmp_path / "e2")


@pytest.fixture(scope="module")
def rm_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-rm")
    train = separable_pairs(d / "train.jsonl", ["water", "bees", "music", "snow", "rain", "stars"], 80, 0)
    cfg = compose(
        "stage=rm", *tiny_overrides(tiny_model, f"data.train={train}", "train.max_steps=10", "train.lr=3e-3")
    )
    execute(cfg, d / "run")
    return d / "run"


def test_reward_model_run_scores_completions_for_grpo_and_eval(
    tiny_model, dpo_run, rm_run, tmp_path, monkeypatch
):
    """An rm run as a reward: the function GRPO/RLOO get from grpo.reward=<rm dir> prefers the
    kind of answer it was trained to prefer, and eval.reward=<rm dir> reports its mean score and
    the win-rate it judges (stub generator: the model answers well, the baseline badly)."""
    from align import rewards

    cfg = compose("stage=grpo", *tiny_overrides(tiny_model, f"grpo.reward={rm_run}"))
    (fn,) = rewards.resolve(str(rm_run), cfg, key="grpo.reward")
    prompt = [{"role": "user", "content": "Tell me about the ocean."}]
    good = [{"role": "assistant", "content": "good answer about ocean yes"}]
    bad = [{"role": "assistant", "content": "bad answer about ocean no"}]
    s_good, s_bad = fn(prompts=[prompt, prompt], completions=[good, bad])
    assert s_good > s_bad

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": t, "prompt": f"Tell me about the {t}.", "constraints": [{"type": "lowercase"}]}
            for t in ("moon", "city")
        ],
    )
    real = evaluation.generate

    def stub(model, tokenizer, prompts, **kw):
        gens = real(model, tokenizer, prompts, **kw)
        for g, p in zip(gens, prompts, strict=True):
            topic = (p if isinstance(p, str) else p[-1]["content"]).split()[-1].rstrip(".")
            g.text = (
                f"good answer about {topic} yes"
                if kw["desc"].endswith("model")
                else f"bad answer about {topic} no"
            )
        return gens

    monkeypatch.setattr(evaluation, "generate", stub)
    cfg = compose(
        "stage=eval",
        *tiny_overrides(
            tiny_model,
            f"eval.model={dpo_run[0]}",
            f"eval.prompts={prompts}",
            f"eval.reward={rm_run}",
            "eval.max_pairs=0",
        ),
        "eval.max_new_tokens=4",
    )
    m = execute(cfg, tmp_path / "eval")
    assert m["eval/rm/score"] > m["eval/base/rm/score"]
    assert m["eval/win_rate/rm"] == 1.0


@pytest.mark.parametrize(
    ("trained", "on_eval_command", "expected"),
    [("none", "auto", "none"), ("bf16", "auto", "bf16"), ("auto", "auto", "auto"), ("none", "bf16", "bf16")],
)
def test_eval_runs_at_the_runs_precision_unless_the_eval_command_pins_one(
    tmp_path, monkeypatch, trained, on_eval_command, expected
):
    from omegaconf import OmegaConf

    from align import backbone

    monkeypatch.setenv("ALIGN_CPU_BF16", "1")  # a CPU with native bf16, where `auto` means bf16
    OmegaConf.save(compose("stage=sft", f"train.autocast={trained}"), tmp_path / "config.yaml")
    cfg = compose("stage=eval", f"train.autocast={on_eval_command}")
    run_cfg = evaluation._cfg_from_run(cfg, tmp_path, cfg.model.name_or_path)
    assert run_cfg.train.autocast.value == expected
    assert (backbone.detect_runtime(run_cfg).autocast_dtype is None) is (expected == "none")
