"""KTO: unpaired feedback (prompt, completion, desirable or not) -> policy adapter with TRL's
KTOTrainer. A file of preference pairs works too: each pair becomes a desirable and an
undesirable row (align.data.unpair).

The reference is the adapter-disabled base model, or, with ``kto.init=<sft run dir>``, a frozen
copy of that run's adapter (which is also where the policy starts), as for stage=dpo.
"""

from __future__ import annotations

import time

from align import backbone, training
from align.config import PREFERENCE_STAGES
from align.training import StageContext

HEADLINE = ["eval/rewards/margins", "eval/kl", "eval/loss", "train/loss", "train/global_step"]


def run(ctx: StageContext) -> dict[str, float]:
    from trl import KTOConfig

    from align.trainers import AlignKTOTrainer

    cfg = ctx.cfg
    k = cfg.kto
    init = training.init_run(cfg, "kto.init", expect=("sft", *PREFERENCE_STAGES))
    split = training.load_data(cfg, "unpaired", training.needed_train_rows(cfg))
    bb = backbone.build(cfg, init_adapter=init.adapter_dir if init else None)
    args = KTOConfig(
        # KTO's KL term pairs each row with the completion of the row before it in the batch:
        # rows are read in order (the data is shuffled, and pairs interleaved, by align.data)
        **training.trainer_args(
            ctx, bb.runtime, has_eval=split.eval is not None, train_sampling_strategy="sequential"
        ),
        max_length=cfg.model.max_length,
        beta=k.beta,
        loss_type=k.loss_type,
        desirable_weight=k.desirable_weight,
        undesirable_weight=k.undesirable_weight,
        precompute_ref_log_probs=k.precompute_ref_log_probs,
    )
    started = time.perf_counter()
    trainer = AlignKTOTrainer(
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
        beta=k.beta,  # KTO logs rewards/chosen = beta * log-ratio to the reference, as DPO does
    )
