"""curves.png and eval.png without a model: panels picked by metric name, and a chart that
cannot be drawn never ends a run."""

from __future__ import annotations

import logging

import pytest

from align import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_panels_come_from_metric_names_not_stages():
    history = [
        # a TRL preference trainer (DPO, and KTO/ORPO/SimPO log the same names)
        {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01, "kl": 0.0, "step": 1},
        {"eval_loss": 0.68, "eval_rewards/accuracies": 0.6, "step": 1},
        {"loss": 0.60, "rewards/accuracies": 0.75, "rewards/margins": 0.2, "kl": 0.1, "step": 2},
        # the end-of-training summary entry is not a point on a curve
        {"train_runtime": 3.0, "train_loss": 0.64, "step": 2},
    ]
    s = plots.series(history)
    assert list(s) == ["loss", "preference accuracy", "reward margin", "KL"]
    assert s["loss"]["loss"] == ([1.0, 2.0], [0.69, 0.60])
    assert s["loss"]["held-out loss"] == ([1.0], [0.68])
    assert s["preference accuracy"]["held-out rewards/accuracies"] == ([1.0], [0.6])
    assert "train_loss" not in str(s)


def test_ppo_history_without_steps_gets_score_kl_entropy(tmp_path):
    history = [
        {"loss/policy": -0.1, "objective/scores": 0.2 * i, "objective/kl": 0.01 * i, "objective/entropy": 5.0}
        for i in range(5)
    ]
    s = plots.series(history)
    assert list(s) == ["loss", "score / reward", "KL", "entropy"]
    assert s["KL"]["objective/kl"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]  # step = index + 1
    out = plots.curves(history, tmp_path / "curves.png", title="stage=ppo")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_nothing_to_draw_writes_nothing(tmp_path):
    assert plots.curves([{"train_runtime": 1.0, "step": 1}], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_a_plotting_error_is_one_warning_line(caplog):
    def broken():
        raise ValueError("no font\nsecond line")

    with caplog.at_level(logging.WARNING):
        assert plots.safely("curves.png", broken) is None
    (rec,) = caplog.records
    assert "curves.png not written (ValueError: no font)" in rec.getMessage()
    assert "\n" not in rec.getMessage()


def test_per_type_chart_is_a_png(tmp_path):
    per_type = {
        "base": {"lowercase": {"instructions": 4, "instruction_accuracy": 0.25}},
        "dpo:run": {
            "lowercase": {"instructions": 4, "instruction_accuracy": 0.75},
            "no_commas": {"instructions": 2, "instruction_accuracy": 0.5},
        },
    }
    data = plots.per_type_chart(per_type, tmp_path / "eval.png", "2 models", 6).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert plots.per_type_chart({"base": {}}, tmp_path / "none.png") is None


@pytest.mark.parametrize("bad", [[{"loss": "nan?", "step": 1}], [None, 3], [{"loss": float("inf")}]])
def test_odd_entries_are_skipped(bad):
    assert plots.series(bad) == {}
