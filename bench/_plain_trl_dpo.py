"""The baseline bench/dpo.py compares against: the DPO script a TRL user would write.

TRL's defaults except what must match align's run (model, rows, LoRA, batch size, max
length, precision, steps, learning rate, beta). Prints one `BENCH_RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--gradient-checkpointing",
        choices=["default", "true", "false"],
        default="default",
        help="TRL's default (on) unless set; for finding where memory goes, not used by bench/dpo.py",
    )
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align import backbone, data
    from align.__main__ import config_dir
    from align.config import register

    # the same rows and model files align's run uses (read with align's loader, then handed
    # to TRL as a plain in-memory Dataset, as a TRL script would)
    register()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=[f"data.max_eval_rows={args.eval_rows}"])
    model_dir = backbone.resolve_model_path(cfg.model)
    split = data.load(cfg.data, "preference", seed=42, needed_train_rows=args.steps * args.batch_size)
    train_rows, eval_rows = split.train.to_list(), split.eval.to_list()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dpo_cfg = DPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=0.1,
        max_length=args.max_length,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=42,
        **(
            {}
            if args.gradient_checkpointing == "default"
            else {"gradient_checkpointing": args.gradient_checkpointing == "true"}
        ),
    )
    peft = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    t = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=dpo_cfg,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tok,
        peft_config=peft,
    )
    trainer.train()
    train_s = time.perf_counter() - t
    metrics = trainer.evaluate()
    print("BENCH_RESULT " + json.dumps({"train_s": train_s, "eval_acc": metrics["eval_rewards/accuracies"]}))


if __name__ == "__main__":
    main()
