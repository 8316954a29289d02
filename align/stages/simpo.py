"""SimPO: preference pairs -> policy adapter with TRL's experimental CPOTrainer and
``loss_type="simpo"`` (trl.experimental.cpo; tested with TRL 1.16.0). The implicit reward is
``simpo.beta`` times the mean per-token log-prob of a response (length-normalised, no reference
model), and the loss asks chosen to beat rejected by a margin ``simpo.gamma``. ``simpo.cpo_alpha``
> 0 adds an NLL term on the chosen responses (CPO-SimPO). Starts from the base or from a run
(``simpo.init=<run dir>``).
"""

from __future__ import annotations

import time

from align import backbone, training
from align.config import POLICY_STAGES
from align.training import StageContext

HEADLINE = ["eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from align.trainers import cpo_classes

    AlignCPOTrainer, CPOConfig = cpo_classes()
    cfg = ctx.cfg
    s = cfg.simpo
    init = training.init_run(cfg, "simpo.init", expect=POLICY_STAGES)
    split = training.load_data(cfg, "preference", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    args = CPOConfig(
        **training.trainer_args(ctx, bb.runtime, has_eval=split.eval is not None),
        max_length=cfg.model.max_length,
        remove_unused_columns=False,  # what the trainer's pair collator needs (TRL sets it, with a warning)
        loss_type="simpo",
        beta=s.beta,
        simpo_gamma=s.gamma,
        cpo_alpha=s.cpo_alpha,
        label_smoothing=s.label_smoothing,
    )
    started = time.perf_counter()
    trainer = AlignCPOTrainer(
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
