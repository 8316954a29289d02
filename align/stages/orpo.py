"""ORPO: preference pairs -> policy adapter with TRL's experimental ORPOTrainer (trl.experimental.orpo;
tested with TRL 1.16.0). One loss: the SFT loss on the chosen response plus ``orpo.beta`` (the
paper's lambda) times an odds-ratio term that favours chosen over rejected. No reference model:
it can start from the base (the usual use, SFT and preference in one stage) or from a run
(``orpo.init=<run dir>``).
"""

from __future__ import annotations

import time

from align import backbone, training
from align.config import POLICY_STAGES
from align.training import StageContext

HEADLINE = [
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/nll_loss",
    "eval/loss",
    "train/loss",
    "train/global_step",
]


def run(ctx: StageContext) -> dict[str, float]:
    from align.trainers import orpo_classes

    AlignORPOTrainer, ORPOConfig = orpo_classes()
    cfg = ctx.cfg
    init = training.init_run(cfg, "orpo.init", expect=POLICY_STAGES)
    split = training.load_data(cfg, "preference", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    args = ORPOConfig(
        **training.trainer_args(ctx, bb.runtime, has_eval=split.eval is not None),
        max_length=cfg.model.max_length,
        remove_unused_columns=False,  # what the trainer's pair collator needs (TRL sets it, with a warning)
        beta=cfg.orpo.beta,
    )
    started = time.perf_counter()
    trainer = AlignORPOTrainer(
        model=bb.model,
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
        lineage={"init": str(init.run_dir) if init else None, "reference": None},
        reference_free=True,  # collapse check on the per-token logps/chosen: train.max_token_logp_drop
    )
