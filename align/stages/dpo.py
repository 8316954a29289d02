"""DPO: preference pairs -> policy adapter with TRL's DPOTrainer.

The reference is the adapter-disabled base model, or, with ``dpo.init=<sft run dir>``,
a frozen copy of the SFT adapter (which is also where the policy starts).
"""

from __future__ import annotations

import time

from align import artifacts, backbone, guard, training
from align.config import dpo_loss_types
from align.training import StageContext

HEADLINE = ["eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import DPOConfig

    from align.trainers import AlignDPOTrainer

    cfg = ctx.cfg
    init = None
    if cfg.dpo.init:
        init = artifacts.read(
            cfg.dpo.init, key="dpo.init", expect_stage=("sft", "dpo"), base_model=cfg.model.name_or_path
        )
        training.check_init_kind(cfg, init, "dpo.init")
    split = training.load_data(cfg, "preference", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    ref_model = None
    if init is not None and bb.peft_config is None and not hasattr(bb.model, "peft_config"):
        # adapter=freeze from a freeze run: the reference is that run's model (TRL would reload the base)
        ref_model, _, _ = backbone.load_trained(cfg, init.adapter_dir)
        ref_model.requires_grad_(False)
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
        ref_model=ref_model,
        args=args,
        train_dataset=split.train,
        eval_dataset=split.eval,
        processing_class=bb.tokenizer,
        peft_config=bb.peft_config,
    )
    # checkpoints, SIGTERM/SIGINT, non-finite steps, resume, collapse (train.max_logp_drop)
    guard.train(ctx, trainer, beta=cfg.dpo.beta)
    metrics = training.train_metrics(trainer, since=started) | training.evaluate(trainer)
    lineage = {
        "init": str(init.run_dir) if init else None,
        "reference": "init adapter" if init else "base model",
    }
    return training.finish(
        ctx,
        model=trainer.model,
        tokenizer=bb.tokenizer,
        metrics=metrics,
        data_info=split.info,
        headline=HEADLINE,
        lineage=lineage,
    )
