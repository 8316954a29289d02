"""TRL's trainers with align's speedups.

* Length-grouped batching for preference pairs (DPO, RM, ORPO, SimPO): pairs of similar length
  share a batch, so less compute goes to padding (TRL 1.16 disables DPO's padding-free mode).
* Reference log-probabilities cached on disk across runs (DPO). TRL's ``precompute_ref_log_probs`` caches beside the dataset under a fingerprint that
changes from run to run, so every rerun and every job of a sweep recomputes the
reference pass. Here the key is what the numbers depend on: the reference weights (TRL's
own hash of the model), the tokenized rows and the maximum length. A ``-m`` sweep over
``dpo.beta`` therefore computes the reference log-probs once.
* GRPO and RLOO sample through align.sampling (adapter merged while sampling, finished rows
  dropped) instead of ``model.generate``, where TRL would use plain transformers generation
  with settings align.sampling implements (no vLLM, images, tools, min_p or repetition
  penalty, no DeepSpeed ZeRO-3).
* On a CPU, TRL's fused LM head scores only the positions that have a label (the completion),
  as it does on CUDA, not every prompt and padding position (:func:`score_labelled_positions_only`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer

from align.cache import cache_root

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# TRL's experimental ORPO/CPO trainers tokenize a pair as whole sequences (prompt + response)
FULL_COLUMNS = ("chosen_input_ids", "rejected_input_ids")


def score_labelled_positions_only() -> None:
    """TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``: the SFT, DPO, KTO, GRPO
    and RLOO losses and the DPO reference pass) projects through the LM head only the positions
    whose label is not -100 where Triton runs it (CUDA, XPU), and every position elsewhere, so
    that tile shapes stay fixed for compiled backends (Neuron). Nothing is compiled on a CPU,
    where the extra positions (prompts, padding: half or more of a preference batch) cost a
    49k-vocabulary projection each, forward and backward. On a CPU it now takes the labelled
    positions only, as on CUDA: the same log-probs, the others are zero either way."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)  # TRL 1.16: used for this choice alone
    if original is None or getattr(original, "align_cpu_compact", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    compact.align_cpu_compact = True
    trl_utils._use_triton = compact


score_labelled_positions_only()


def _content_hash(dataset) -> str:
    h = hashlib.sha256()
    cols = [c for c in TOKEN_COLUMNS if c in dataset.column_names]
    for batch in dataset.select_columns(cols).iter(batch_size=1024):
        h.update(json.dumps([batch[c] for c in cols]).encode())
    return h.hexdigest()


def pair_lengths(dataset) -> list[int]:
    """Tokens a pair puts in a batch row: its prompt plus the longer of its two completions."""
    cols = dataset.column_names
    if all(c in cols for c in FULL_COLUMNS):  # ORPO/CPO: each column holds prompt + response
        return [max(len(c), len(r)) for c, r in zip(*(dataset[c] for c in FULL_COLUMNS), strict=True)]
    chosen, rejected = dataset["chosen_ids"], dataset["rejected_ids"]
    prompts = dataset["prompt_ids"] if "prompt_ids" in cols else [[]] * len(chosen)
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


class LengthGroupedPairsMixin:
    """``train.group_by_length`` for datasets of tokenized pairs, which have no ``input_ids``
    column for transformers' own length-grouped sampler to measure."""

    def _pair_sampler(self, dataset, batch_size: int):
        if (
            dataset is None
            or self.args.train_sampling_strategy != "group_by_length"
            or not {"chosen_ids", FULL_COLUMNS[0]} & set(dataset.column_names)
        ):
            return None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            batch_size, lengths=pair_lengths(dataset), generator=torch.Generator().manual_seed(seed)
        )

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return self._pair_sampler(dataset, batch) or super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        return self._pair_sampler(eval_dataset, self.args.eval_batch_size) or super()._get_eval_sampler(
            eval_dataset
        )


class AlignRewardTrainer(LengthGroupedPairsMixin, RewardTrainer):
    pass


class AlignDPOTrainer(LengthGroupedPairsMixin, DPOTrainer):
    def _ref_cache_path(self, dataset):
        key = hashlib.sha256(
            "|".join(
                [self._precompute_model_hash or "", _content_hash(dataset), str(self.args.max_length)]
            ).encode()
        ).hexdigest()[:32]
        return cache_root() / "ref_logps" / f"{key}.pt"

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # the held-out reference pass can wait only while the reference is not the policy itself: a PEFT
        # policy (adapters disabled) or a separate reference model; a full / layer-freezing policy without
        # one is its own reference at the start only, so its held-out log-probs are taken now
        deferrable = self.ref_model is not None or hasattr(self.model, "peft_config")
        if name == "eval" and deferrable and not getattr(self, "_eval_ref_due", False):
            # the held-out set's reference log-probs are computed when it is first evaluated
            # (as TRL without precompute does), not before training starts
            self._eval_ref_batch_size = batch_size
            return dataset
        path = self._ref_cache_path(dataset)
        if path.is_file():
            cached = torch.load(path)
            if len(cached["ref_chosen_logps"]) == len(dataset):
                log.info("reference log-probs for %s dataset: reused %s", name, path)
                return dataset.add_column("ref_chosen_logps", cached["ref_chosen_logps"].tolist()).add_column(
                    "ref_rejected_logps", cached["ref_rejected_logps"].tolist()
                )
        dataset = self._reference_pass_longest_first(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save({c: torch.tensor(dataset[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")}, tmp)
            os.replace(tmp, path)
        return dataset

    def _reference_pass_longest_first(self, dataset, name, batch_size):
        """TRL's reference pass over the pairs sorted longest first, then put back in the dataset's
        order: each batch is padded to its longest pair, so sorted batches carry less padding (the
        pass is a forward of every pair, most of a cold run's extra time)."""
        lengths = pair_lengths(dataset)
        order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
        if order == list(range(len(dataset))):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        done = super()._precompute_ref_logps(dataset.select(order), name, batch_size)
        back = [0] * len(order)
        for position, row in enumerate(order):
            back[row] = position
        return done.select(back)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        pending = getattr(self, "_eval_ref_batch_size", None)
        if pending and eval_dataset is None and "ref_chosen_logps" not in self.eval_dataset.column_names:
            self._eval_ref_due = True
            self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", pending)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


class AlignKTOTrainer(KTOTrainer):
    """TRL's KTOTrainer (stable in TRL 1.16; ``trl.experimental.kto`` is a deprecated alias)."""


TESTED_TRL = "1.16"  # the TRL release align's experimental-namespace stages (orpo, simpo) were tested with


def _experimental(name: str):
    """``trl.experimental.<name>``, imported on use: importing trl.experimental warns that its
    APIs may change or go without notice, so a TRL other than the tested one is named in the log."""
    import importlib

    import trl

    if not trl.__version__.startswith(TESTED_TRL + "."):
        log.warning(
            "trl.experimental.%s: align was tested with TRL %s.x; this is TRL %s, whose experimental "
            "API may differ (pip install 'trl==1.16.0' to get the tested one)",
            name,
            TESTED_TRL,
            trl.__version__,
        )
    return importlib.import_module(f"trl.experimental.{name}")


class SoftPromptLogitsMixin:
    """adapter=prompt under TRL's experimental ORPO/CPO: peft puts the soft prompt's positions in
    front of the logits, which these trainers compare with the labels position by position; the
    model's output drops them for the trainer's forward (stage=dpo's trainer aligns them itself)."""

    def concatenated_forward(self, model, *args, **kwargs):
        def trim(module, inputs, kw, out):
            ids = kw.get("input_ids", inputs[0] if inputs else None)
            extra = out.logits.size(1) - ids.size(1) if ids is not None else 0
            if extra > 0:
                out.logits = out.logits[:, extra:]
            return out

        handle = model.register_forward_hook(trim, with_kwargs=True)
        try:
            return super().concatenated_forward(model, *args, **kwargs)
        finally:
            handle.remove()


def orpo_classes():
    """(AlignORPOTrainer, ORPOConfig) from TRL's experimental ORPO."""
    mod = _experimental("orpo")

    class AlignORPOTrainer(SoftPromptLogitsMixin, LengthGroupedPairsMixin, mod.ORPOTrainer):
        pass

    return AlignORPOTrainer, mod.ORPOConfig


def cpo_classes():
    """(AlignCPOTrainer, CPOConfig) from TRL's experimental CPO (SimPO is its loss_type=simpo)."""
    mod = _experimental("cpo")

    class AlignCPOTrainer(SoftPromptLogitsMixin, LengthGroupedPairsMixin, mod.CPOTrainer):
        pass

    return AlignCPOTrainer, mod.CPOConfig


class FastSamplingMixin:
    """TRL's online trainers (GRPO, RLOO) sample with align.sampling where it applies."""

    def _align_sample(self, prompt_ids, images, multimodal_fields) -> list[list[int]] | None:
        """Completion ids (up to and including the first EOS), or None where TRL's own path
        must run."""
        from trl.models import unwrap_model_for_generation

        from align import sampling

        plain = (
            not self.use_vllm
            and not getattr(self, "use_transformers_continuous_batching", False)
            and not images
            and not multimodal_fields
            and not getattr(self, "tools", None)
            and self.min_p is None
            and self.repetition_penalty == 1.0
            and not self.args.generation_kwargs
            and not self.is_deepspeed_enabled
        )
        if not plain:
            return None
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            done = sampling.sample(
                model,
                prompt_ids,
                sampling.SamplingParams(
                    max_new_tokens=self.max_completion_length,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    top_k=self.top_k or 0,
                ),
                stop=list(self.eos_token_ids),
                pad_id=self._tokenizer.pad_token_id,
                device=self.accelerator.device,
                progress=False,
            )
        return [c.ids for c in done]


class AlignGRPOTrainer(FastSamplingMixin, GRPOTrainer):
    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        ids = self._align_sample(prompt_ids, images, multimodal_fields)
        if ids is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return ids, None


class AlignRLOOTrainer(FastSamplingMixin, RLOOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        ids = self._align_sample(prompt_ids, images, multimodal_fields)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields) if ids is None else ids
