"""DPO: preference pairs -> policy adapter with TRL's DPOTrainer.

The reference is the adapter-disabled base model, or, with ``dpo.init=<sft run dir>``,
a frozen copy of the SFT adapter (which is also where the policy starts).
"""

from __future__ import annotations

import time

from align import backbone, training
from align.config import dpo_loss_types
from align.training import StageContext

HEADLINE = ["eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import DPOConfig

    from align.trainers import AlignDPOTrainer

    cfg = ctx.cfg
    init = training.init_run(cfg, "dpo.init", expect=("sft", "dpo"))
    split = training.load_data(cfg, "preference", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    args = DPOConfig(
        **training.trainer_args(ctx, bb.runtime, has_eval=split.eval is not None),
        max_length=cfg.model.max_length,
        beta=cfg.dpo.beta,
        loss_type=dpo_loss_types(cfg),
        loss_weights=list(cfg.dpo.loss_weights) if cfg.dpo.loss_weights else None,
        label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
    )
    started = time.perf_counter()  # tokenization + reference pass + training
    trainer = AlignDPOTrainer(
        model=bb.model,
        ref_model=training.init_reference(cfg, bb, init),  # adapter=freeze from a freeze run
        args=args,
        train_dataset=split.train,
        eval_dataset=split.eval,
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    return training.train_and_finish(
        ctx,
        trainer,
        tokenizer=bb.tokenizer,
        data_info=split.info,
        headline=HEADLINE,
        started=started,
        lineage={
            "init": str(init.run_dir) if init else None,
            "reference": "init adapter" if init else "base model",
        },
        beta=cfg.dpo.beta,  # collapse check: train.max_logp_drop
    )
