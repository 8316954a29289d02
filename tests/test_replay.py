"""data.replay: general rows mixed into SFT at data.replay_fraction, deterministically."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, compose, tiny_overrides

from align import training
from align.errors import AlignError
from align.stages import execute

GENERAL = REPO / "reward_data" / "general_sft.jsonl"


def _general_prompts() -> set[str]:
    return {json.loads(x)["messages"][0]["content"] for x in GENERAL.read_text().splitlines()}


def _rows(split):
    return [dict(r) for r in split.train]


def _is_replay(row, general) -> bool:
    return row["prompt"][0]["content"] in general


def test_replay_replaces_the_requested_fraction_of_a_fixed_step_budget(tiny_model):
    def replay_cfg(*extra):
        return compose(
            "stage=sft",
            *tiny_overrides(
                tiny_model,
                "data=tiny",
                f"data.replay={GENERAL}",
                "data.replay_fraction=0.25",
                "train.max_steps=5",
                *extra,
            ),
        )

    cfg = replay_cfg()
    split = training.load_data(cfg, "sft", training.needed_train_rows(cfg))  # 5 steps x 4 rows
    rows, general = _rows(split), _general_prompts()
    assert len(rows) == 20  # the step budget is kept
    assert sum(_is_replay(r, general) for r in rows) == 5 == split.info["replay_rows"]
    assert split.info["replay_fraction"] == 0.25 and split.info["task_rows"] == 15
    again = _rows(training.load_data(cfg, "sft", training.needed_train_rows(cfg)))
    assert again == rows  # deterministic (seeded)
    assert _rows(training.load_data(replay_cfg("seed=7"), "sft", 20)) != rows  # and the seed moves it


def test_replay_adds_rows_to_whole_epochs(tiny_model):
    cfg = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", f"data.replay={GENERAL}", "data.replay_fraction=0.2"),
    )
    plain = compose("stage=sft", *tiny_overrides(tiny_model, "data=tiny"))
    n_task = len(_rows(training.load_data(plain, "sft", None)))
    split = training.load_data(cfg, "sft", None)
    rows = _rows(split)
    n_replay = sum(_is_replay(r, _general_prompts()) for r in rows)
    assert len(rows) - n_replay == n_task  # no task row is lost
    assert n_replay == round(n_task * 0.2 / 0.8) == split.info["replay_rows"]
    assert n_replay / len(rows) == pytest.approx(0.2, abs=0.02)


def test_replay_is_in_the_run_summary_and_artifact(tiny_model, tmp_path, capsys):
    cfg = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", f"data.replay={GENERAL}", "train.max_steps=2"),
    )
    execute(cfg, tmp_path / "run")
    data = json.loads((tmp_path / "run" / "artifact.json").read_text())["data"]
    assert data["replay"] == str(GENERAL) and data["replay_rows"] == 2  # 20% of 2 x 4 rows
    out = capsys.readouterr().out
    assert "  replay   2 of 8 training rows (25.0%)" in out or "  replay   2 of 8 training rows" in out


def test_replay_bad_settings_fail_before_loading(tiny_model, tmp_path):
    bad = compose(
        "stage=sft",
        *tiny_overrides(tiny_model, "data=tiny", f"data.replay={GENERAL}", "data.replay_fraction=1.0"),
    )
    with pytest.raises(AlignError, match="data.replay_fraction=1.0 must be in"):
        execute(bad, tmp_path / "a")
    dpo = compose("stage=dpo", *tiny_overrides(tiny_model, f"data.replay={GENERAL}"))
    with pytest.raises(AlignError, match="data.replay is for SFT-like stages"):
        execute(dpo, tmp_path / "b")
