"""stage=rlhf: sft -> rm -> ppo chained on the tiny model, each stage reading the previous artifact."""

from __future__ import annotations

import json

from conftest import compose, tiny_overrides, write_jsonl
from test_rm import separable_pairs


def test_rlhf_chains_sft_rm_ppo_through_their_artifacts(tiny_model, tmp_path):
    from align.stages import execute
    from align.stages.rlhf import stage_config

    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": p["prompt"], "completion": p["chosen"]} for p in separable_pairs(16, 2)],
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(24, 3))
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in separable_pairs(8, 4)]
    )
    cfg = compose(
        "stage=rlhf",
        *tiny_overrides(
            tiny_model,
            f"rlhf.sft_data={sft}",
            f"rlhf.rm_data={pairs}",
            f"rlhf.ppo_data={prompts}",
            "data.eval_fraction=0.25",
            "rlhf.sft.max_steps=2",
            "rlhf.rm.max_steps=3",
            "rlhf.ppo.max_steps=2",
            "ppo.max_new_tokens=8",
            "ppo.kl_coef=0.3",
            "tracking.group=chain-test",
            "rlhf.rm_from_sft=true",
        ),
    )
    metrics = execute(cfg, tmp_path / "rlhf")
    run = tmp_path / "rlhf"
    manifests = {s: json.loads((run / s / "artifact.json").read_text()) for s in ("sft", "rm", "ppo")}
    assert {s: m["stage"] for s, m in manifests.items()} == {"sft": "sft", "rm": "rm", "ppo": "ppo"}
    for s in ("sft", "rm", "ppo"):
        assert (run / s / "adapter" / "adapter_model.safetensors").is_file()
    ppo = manifests["ppo"]["data"]
    assert ppo["policy_init"] == str(run / "sft") and ppo["reward"] == str(run / "rm")
    assert ppo["reference"] == "policy_init adapter"
    # rlhf.rm_from_sft: the reward model starts from the SFT LoRA
    assert manifests["rm"]["data"]["init"] == str(run / "sft")
    # per-stage overrides reached each stage; stage keys come from the top level
    assert metrics["sft/train/global_step"] == 2 and metrics["rm/train/global_step"] == 3
    assert metrics["ppo/train/global_step"] == 2 and metrics["ppo/objective/kl_coef"] == 0.3
    top = json.loads((run / "artifact.json").read_text())
    assert top["stage"] == "rlhf" and top["adapter"]["path"] == "ppo/adapter"
    sub = stage_config(cfg, "ppo", "chain-test", {"sft": run / "sft", "rm": run / "rm"})
    assert sub.tracking.group == "chain-test" and sub.tracking.name == "chain-test-ppo"
    assert sub.train.max_steps == 2 and sub.data.train == str(prompts)
