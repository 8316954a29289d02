"""Reference log-probs are computed once per (reference weights, tokenized data) and reused
by reruns and by sweeps over settings they do not depend on (dpo.beta)."""

from __future__ import annotations

import pytest
from conftest import compose, tiny_overrides
from trl import DPOTrainer

from align.stages import execute


def test_second_run_and_other_beta_reuse_cached_reference_logps(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    calls = []
    original = DPOTrainer._precompute_ref_logps

    def counting(self, dataset, name, batch_size):
        calls.append(name)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", counting)
    common = tiny_overrides(tiny_model, "data=tiny", "train.max_steps=3", "train.lr=1e-3")
    first = execute(compose("stage=dpo", *common), tmp_path / "a")
    assert calls == ["train", "eval"]
    again = execute(compose("stage=dpo", *common), tmp_path / "b")
    other_beta = execute(compose("stage=dpo", "dpo.beta=0.3", *common), tmp_path / "c")
    assert calls == ["train", "eval"]  # nothing recomputed
    assert again["eval/loss"] == pytest.approx(first["eval/loss"], abs=1e-6)
    assert other_beta["eval/loss"] != pytest.approx(first["eval/loss"], abs=1e-6)
    # the key is conservative: another seed gives other initial adapter weights, which the model hash covers
    execute(compose("stage=dpo", "seed=7", *common), tmp_path / "d")
    assert calls == ["train", "eval", "train", "eval"]


def test_reference_pass_runs_longest_first_and_returns_each_row_its_own_logps(
    tiny_model, tmp_path, monkeypatch
):
    """The cold reference pass batches the pairs longest first (less padding), and every row still
    gets the log-probs TRL's pass in the dataset's own order gives it."""
    from align.trainers import AlignDPOTrainer, pair_lengths

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    seen, checked = [], []
    original = DPOTrainer._precompute_ref_logps

    def recording(self, dataset, name, batch_size):
        seen.append(pair_lengths(dataset))
        return original(self, dataset, name, batch_size)

    align_pass = AlignDPOTrainer._precompute_ref_logps

    def compared(self, dataset, name, batch_size):
        out = align_pass(self, dataset, name, batch_size)
        if "ref_chosen_logps" in out.column_names:
            plain = original(self, dataset, name, batch_size)  # TRL's pass in the dataset's order
            for c in ("ref_chosen_logps", "ref_rejected_logps"):
                assert out[c] == pytest.approx(plain[c], rel=1e-5, abs=1e-4)
            checked.append(name)
        return out

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", recording)
    monkeypatch.setattr(AlignDPOTrainer, "_precompute_ref_logps", compared)
    execute(
        compose("stage=dpo", *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=3")), tmp_path / "a"
    )
    assert checked == ["train", "eval"]
    assert seen[0] == sorted(seen[0], reverse=True) and seen[1] != seen[0]  # sorted, and the data was not
