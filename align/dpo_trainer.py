"""TRL's DPOTrainer with reference log-probabilities cached on disk across runs.

TRL's ``precompute_ref_log_probs`` caches beside the dataset under a fingerprint that
changes from run to run, so every rerun and every job of a sweep recomputes the
reference pass. Here the key is what the numbers depend on: the reference weights (TRL's
own hash of the model), the tokenized rows and the maximum length. A ``-m`` sweep over
``dpo.beta`` therefore computes the reference log-probs once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import torch
from trl import DPOTrainer

from align.cache import cache_root

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _content_hash(dataset) -> str:
    h = hashlib.sha256()
    cols = [c for c in TOKEN_COLUMNS if c in dataset.column_names]
    for batch in dataset.select_columns(cols).iter(batch_size=1024):
        h.update(json.dumps([batch[c] for c in cols]).encode())
    return h.hexdigest()


class CachedRefDPOTrainer(DPOTrainer):
    def _ref_cache_path(self, dataset):
        key = hashlib.sha256(
            "|".join(
                [self._precompute_model_hash or "", _content_hash(dataset), str(self.args.max_length)]
            ).encode()
        ).hexdigest()[:32]
        return cache_root() / "ref_logps" / f"{key}.pt"

    def _precompute_ref_logps(self, dataset, name, batch_size):
        path = self._ref_cache_path(dataset)
        if path.is_file():
            cached = torch.load(path)
            if len(cached["ref_chosen_logps"]) == len(dataset):
                log.info("reference log-probs for %s dataset: reused %s", name, path)
                return dataset.add_column("ref_chosen_logps", cached["ref_chosen_logps"].tolist()).add_column(
                    "ref_rejected_logps", cached["ref_rejected_logps"].tolist()
                )
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save({c: torch.tensor(dataset[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")}, tmp)
            os.replace(tmp, path)
        return dataset
