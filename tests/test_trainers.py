"""align's trainer speedups: length-grouped batches of preference pairs."""

from __future__ import annotations

import random

from conftest import compose, tiny_overrides

from align import backbone
from align.trainers import AlignDPOTrainer, pair_lengths


def _pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = " ".join(["water"] * rng.choice([2, 4, 8, 16, 32, 64]))
        rows.append({"prompt": f"Question {i}?", "chosen": f"yes {words}", "rejected": f"no {words} no"})
    return rows


def _padding_fraction(group_by_length: bool, tiny_model, tmp_path) -> float:
    from datasets import Dataset
    from trl import DPOConfig

    cfg = compose("stage=dpo", *tiny_overrides(tiny_model))
    bb = backbone.build(cfg)
    args = DPOConfig(
        output_dir=str(tmp_path / f"out-{group_by_length}"),
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_length=256,
        precompute_ref_log_probs=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        seed=0,
    )
    trainer = AlignDPOTrainer(
        model=bb.model,
        args=args,
        train_dataset=Dataset.from_list(_pairs(96)),
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    real = total = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    assert total and real
    return 1 - real / total


def test_length_grouping_cuts_padding_of_pairs(tiny_model, tmp_path):
    grouped = _padding_fraction(True, tiny_model, tmp_path)
    shuffled = _padding_fraction(False, tiny_model, tmp_path)
    assert grouped < 0.5 * shuffled, (grouped, shuffled)


def test_pair_length_is_prompt_plus_longer_completion():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}])
    assert pair_lengths(ds) == [5]
