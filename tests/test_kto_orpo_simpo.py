"""stage=kto, stage=orpo and stage=simpo on the tiny model: they learn (the loss falls), write
a run that later stages load, start from an SFT run, and KTO reads unpaired feedback as well
as preference pairs."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from conftest import compose, separable_pairs, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from align import artifacts, backbone, data, evaluation
from align.errors import AlignError
from align.guard import CollapseGuard
from align.stages import execute

TOPICS_TRAIN = ["water", "bees", "music", "snow", "rain", "stars", "river", "forest"]
TOPICS_TEST = ["ocean", "mountain", "city", "moon"]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return separable_pairs(d / "train.jsonl", TOPICS_TRAIN, 160, 0), separable_pairs(
        d / "test.jsonl", TOPICS_TEST, 16, 1
    )


def unpaired_rows(n: int, topics: list[str], seed: int) -> list[dict]:
    """Unpaired feedback a tiny model learns: 'good ... yes' is desirable, 'bad ... no' is not
    (an unequal number of each, as real thumbs-up/down data has)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        good = rng.random() < 0.6
        answer = f"good answer about {t} yes" if good else f"bad answer about {t} no"
        rows.append({"prompt": f"Tell me about {t}.", "completion": answer, "label": good})
    return rows


# --------------------------------------------------------------------------- data


def test_unpaired_rows_load_with_their_labels(tmp_path):
    rows = [
        {"prompt": "Name a river.", "completion": "The Nile.", "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Go away.", "label": False},
    ]
    path = write_jsonl(tmp_path / "fb.jsonl", rows[:1] + [{**rows[0], "label": False}])
    cfg = compose("stage=kto", f"data.train={path}", "data.eval_fraction=0")
    split = data.load(cfg.data, "unpaired", seed=0)
    assert sorted(split.train["label"]) == [False, True]
    assert split.info["format"] == "prompt-completion-label" and "pairs_split" not in split.info
    # CSV cells and 1/0 are labels too
    (tmp_path / "fb.csv").write_text("prompt,completion,label\nA?,yes,true\nB?,no,FALSE\nC?,maybe,1\n")
    got = data.validate_rows(data.read_rows(str(tmp_path / "fb.csv")), "unpaired")
    assert [r["label"] for r in got] == [True, False, True]
    # a bad label, or text mixed with messages, names the line
    write_jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[0], "label": "maybe"}])
    with pytest.raises(AlignError, match=r"bad.jsonl:2: 'label' must be true .* got 'maybe'"):
        data.validate_rows(data.read_rows(str(tmp_path / "bad.jsonl")), "unpaired")
    write_jsonl(tmp_path / "mixed.jsonl", [rows[1]])
    with pytest.raises(AlignError, match="mixed.jsonl:1: prompt and completion must both be strings"):
        data.validate_rows(data.read_rows(str(tmp_path / "mixed.jsonl")), "unpaired")


def test_a_paired_file_is_split_into_desirable_and_undesirable_rows(pair_files):
    train, test = pair_files
    cfg = compose("stage=kto", f"data.train={train}", f"data.eval={test}", "data.max_eval_rows=8")
    split = data.load(cfg.data, "unpaired", seed=0, needed_train_rows=12)
    assert split.info["format"] == "prompt-chosen-rejected" and split.info["pairs_split"]
    rows = split.train.to_list()
    assert len(rows) == 12 and len(split.eval) == 8
    # batches of 4 hold 2 + 2, in the order chosen a, chosen b, rejected a, rejected b: no row
    # follows one of its own pair (KTO's KL term pairs a prompt with the completion before it)
    assert [r["label"] for r in rows] == [True, True, False, False] * 3
    assert rows[0]["prompt"] == rows[2]["prompt"] and rows[1]["prompt"] == rows[3]["prompt"]
    assert "good" in rows[0]["completion"][0]["content"] and "bad" in rows[2]["completion"][0]["content"]


# --------------------------------------------------------------------------- stages


STAGE_KEYS = {"kto": "train.lr=1e-3", "orpo": "train.lr=1e-3", "simpo": "train.lr=1e-3"}


@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])
def test_stage_learns_and_writes_a_loadable_artifact(tiny_model, pair_files, tmp_path, stage, caplog):
    train, test = pair_files
    cfg = compose(
        f"stage={stage}",
        *tiny_overrides(
            tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=12", STAGE_KEYS[stage]
        ),
    )
    run_dir = tmp_path / stage
    with caplog.at_level("WARNING"):
        m = execute(cfg, run_dir)
    assert "remove_unused_columns" not in caplog.text  # TRL's collator notice: align sets it itself
    assert m["train/global_step"] == 12
    assert m["train/loss"] < m["train/first_loss"], m  # it learns
    assert m["eval/rewards/margins"] > 0  # ... and prefers the held-out chosen responses
    art = artifacts.read(run_dir, key="test", expect_stage=(stage,))
    assert art.manifest["data"]["init"] is None
    weights = load_file(art.adapter_dir / "adapter_model.safetensors")
    assert weights and not any(".ref." in k for k in weights)  # only the trained adapter
    history = json.loads((run_dir / "log_history.json").read_text())
    assert not any("collapse/logp_drop" in h for h in history)  # a normal run trips no guard
    model, tok, _ = backbone.load_trained(cfg, art.adapter_dir)  # what ppo.policy / export load
    assert model.peft_config["default"].r == cfg.adapter.r and tok.chat_template
    loaded = evaluation.load(compose("stage=eval", *tiny_overrides(tiny_model)), str(run_dir))  # eval.model=
    assert loaded.info["stage"] == stage and loaded.kl_ref is not None


def test_kto_learns_from_unpaired_feedback(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "fb.jsonl", unpaired_rows(120, TOPICS_TRAIN, 0))
    test = write_jsonl(tmp_path / "fb_test.jsonl", unpaired_rows(16, TOPICS_TEST, 1))
    cfg = compose(
        "stage=kto",
        *tiny_overrides(
            tiny_model,
            f"data.train={train}",
            f"data.eval={test}",
            "train.max_steps=12",
            "train.lr=1e-3",
            "kto.undesirable_weight=1.5",  # fewer undesirable rows: weigh them up
        ),
    )
    m = execute(cfg, tmp_path / "kto")
    assert m["train/loss"] < m["train/first_loss"] and m["eval/rewards/margins"] > 0
    manifest = json.loads((tmp_path / "kto" / "artifact.json").read_text())
    assert manifest["data"]["format"] == "prompt-completion-label" and manifest["data"]["train_rows"] == 48


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft-run")
    cfg = compose(
        "stage=sft", *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=20", "train.lr=1e-2")
    )
    execute(cfg, run_dir)
    return run_dir


def test_kto_from_sft_uses_the_sft_adapter_as_policy_and_reference(tiny_model, pair_files, sft_run, tmp_path):
    train, test = pair_files
    common = tiny_overrides(
        tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=1", "train.lr=1e-12"
    )
    m = execute(compose("stage=kto", f"kto.init={sft_run}", *common), tmp_path / "kto")
    # reference == starting policy == the SFT adapter: implicit rewards are ~0
    assert abs(m["eval/rewards/chosen"]) < 1e-3 and abs(m["eval/rewards/rejected"]) < 1e-3
    manifest = json.loads((tmp_path / "kto" / "artifact.json").read_text())
    assert manifest["data"]["init"] == str(sft_run) and manifest["data"]["reference"] == "init adapter"


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_stages_start_from_an_sft_run(tiny_model, pair_files, sft_run, tmp_path, stage):
    train, test = pair_files
    common = tiny_overrides(
        tiny_model, f"data.train={train}", f"data.eval={test}", "train.max_steps=1", "train.lr=1e-12"
    )
    chained = execute(compose(f"stage={stage}", f"{stage}.init={sft_run}", *common), tmp_path / "chained")
    fresh = execute(compose(f"stage={stage}", *common), tmp_path / "fresh")
    # the policy is the SFT model, not the raw base (per-token log-probs differ)
    assert abs(chained["eval/logps/chosen"] - fresh["eval/logps/chosen"]) > 0.1
    manifest = json.loads((tmp_path / "chained" / "artifact.json").read_text())
    assert manifest["data"]["init"] == str(sft_run)


def test_init_must_be_a_policy_run_on_the_same_base(tiny_model, tmp_path):
    with pytest.raises(AlignError, match="not a finished align run"):
        execute(compose("stage=kto", *tiny_overrides(tiny_model, f"kto.init={tmp_path}")), tmp_path / "run")


# --------------------------------------------------------------------------- guards and config


def test_reference_free_collapse_guard_watches_the_per_token_logp():
    guard = CollapseGuard(1.0, "stop", None, "train.max_token_logp_drop")
    state = SimpleNamespace(log_history=[], global_step=0)
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    for step, logp in enumerate([-1.2, -1.5, -2.1, -2.4], start=1):  # drops 0, 0.3, 0.9, 1.2
        state.global_step = step
        logs = {"loss": 1.0, "logps/chosen": logp}
        state.log_history.append(logs)
        guard.on_log(None, state, control, logs=logs)
    assert guard.collapsed_step == 4 and guard.drop == pytest.approx(1.2)
    assert control.should_training_stop and not control.should_save
    assert guard.unit == "nats per token"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stage=kto", "train.batch_size=1"], "KTO estimates its KL term"),
        (["stage=kto", "kto.loss_type=sigmoid"], "kto.loss_type='sigmoid'"),
        (["stage=kto", "kto.desirable_weight=0"], "kto.desirable_weight"),
        (["stage=orpo", "orpo.beta=0"], "orpo.beta=0"),
        (["stage=simpo", "simpo.cpo_alpha=-1"], "simpo.cpo_alpha=-1"),
    ],
)
def test_bad_values_are_refused(overrides, match):
    from align.config import validate

    with pytest.raises(AlignError, match=match):
        validate(compose(*overrides))


def test_later_stages_take_the_new_stages_runs():
    from align.config import POLICY_STAGES, PREFERENCE_STAGES, STAGES
    from align.evaluation import POLICY_STAGES as EVAL_POLICY

    assert {"kto", "orpo", "simpo"} <= set(STAGES) & set(PREFERENCE_STAGES) & set(POLICY_STAGES)
    assert EVAL_POLICY == POLICY_STAGES  # stage=eval eval.model=<kto/orpo/simpo run>
    cfg = compose("stage=simpo")
    assert cfg.simpo.beta == 2.0 and cfg.train.max_steps == 12 and cfg.train.gradient_checkpointing
