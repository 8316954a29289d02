"""An LLM as a classifier: what stage=classify (and stage=eval on its output) is made of.

* :class:`LabelMap`: file labels (ints, bools, strings) <-> class ids, saved with the run.
* :func:`encode`: text -> token ids within ``model.max_length`` (truncating the end or the
  middle).
* :func:`collate`: a batch of examples as padded rows, or packed: several examples per row
  up to ``model.max_length``, position ids restarting at 0 for each example and no attention
  mask, from which transformers builds block-diagonal causal attention (a 4-D mask for
  sdpa/eager; ``cu_seqlens`` varlen kernels for flash attention).
* :func:`class_logits`: the decoder's hidden state at each example's last token through the
  classification head (``score`` of ``AutoModelForSequenceClassification``), for padded and
  packed batches alike.
* :func:`classification_loss`: cross-entropy or focal loss with class and row weights.
* :class:`ClassifierTrainer`: transformers' Trainer with that loss (checkpoints, resume,
  non-finite guard and W&B logging as every other stage).
* :func:`metrics` (scikit-learn), :func:`tuned_threshold`, :func:`save_curves` (matplotlib).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from align import backbone
from align.errors import AlignError

CLASSIFIER_FILE = "classifier.json"  # label names, threshold, truncation: what prediction needs
PREDICTIONS_FILE = "predictions.jsonl"


# --------------------------------------------------------------------------- labels


@dataclass
class LabelMap:
    """Class ids 0..K-1 and the label (canonical name, see ``data.label_key``) each stands for.
    Binary: id 1 is the positive class, whose probability is the score."""

    names: list[str]

    @classmethod
    def from_labels(cls, labels: Sequence[str], order: Sequence[Any] | None = None) -> LabelMap:
        from align.data import label_key

        seen = set(labels)
        if order is not None:
            names = [label_key(x) or str(x) for x in order]
            extra = sorted(seen - set(names))
            if extra:
                raise AlignError(
                    f"the training rows have labels {extra} that classify.labels={list(names)} does not list"
                )
        elif seen <= {"true", "false"}:
            names = ["false", "true"]
        elif all(_is_int(x) for x in seen):
            names = [str(x) for x in sorted(int(x) for x in seen)]
            if len(names) == 1:  # one class seen: still a binary problem
                names = ["0", "1"] if names[0] in ("0", "1") else names
        else:
            names = sorted(seen)
        if len(names) < 2:
            raise AlignError(
                f"the training rows have a single label ({names[0]!r}); a classifier needs at least two classes"
            )
        return cls(names)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def binary(self) -> bool:
        return len(self.names) == 2

    def id(self, key: str, where: str) -> int:
        try:
            return self.names.index(key)
        except ValueError:
            raise AlignError(
                f"{where}: unknown label {key!r}; the classifier knows {self.names} (the labels it was "
                "trained on, or classify.labels)"
            ) from None


def _is_int(x: str) -> bool:
    try:
        int(x)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[int]
    weights: list[float]
    ids: list[str]  # row id (the file's id column, else file:line)
    truncated: int  # rows whose text did not fit model.max_length


def encode(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    labels: LabelMap,
    max_length: int,
    truncate: str = "middle",
) -> Encoded:
    """Token ids of each row's text as the tokenizer encodes it by default (with its BOS, if it
    adds one), at most ``max_length``; labels as ids. Nothing is appended, so the last real
    token is the text's own, which is also where transformers' sequence-classification
    forward reads an exported model's prediction."""
    texts = [r["text"] for r in rows]
    tokenized = tokenizer(texts)["input_ids"] if texts else []
    out = Encoded([], [], [], [], 0)
    for row, ids in zip(rows, tokenized, strict=True):
        if len(ids) > max_length:
            out.truncated += 1
            if truncate == "end":
                ids = ids[:max_length]
            else:
                head = max_length // 2
                ids = ids[:head] + ids[len(ids) - (max_length - head) :]
        out.input_ids.append(list(ids))
        out.labels.append(labels.id(row["label"], row.get("where", "row")))
        out.weights.append(float(row.get("weight", 1.0)))
        out.ids.append(str(row.get("id") or row.get("where") or len(out.ids)))
    return out


def to_dataset(enc: Encoded):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": enc.input_ids,
            "label": enc.labels,
            "weight": enc.weights,
            "length": [len(x) for x in enc.input_ids],
        }
    )


# --------------------------------------------------------------------------- batches


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into bins of at most ``capacity`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def collate(
    examples: Sequence[dict[str, Any]], pad_id: int, *, packing: bool = False, max_length: int = 0
) -> dict[str, torch.Tensor]:
    """Model inputs for ``examples`` (dicts with ``input_ids``, ``label``, optional ``weight``).

    ``row_index``/``first_index``/``last_index`` locate each example's first and last token, in
    the order of ``examples``.
    Padded: one example per row, right-padded, with an attention mask. Packed: examples share
    rows of at most ``max_length`` tokens; ``position_ids`` restart at 0 for every example and
    there is no attention mask, so that each example attends only to itself (the padding at
    the end of a row is one more block, never read).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    if packing:
        bins = pack(lengths, max(max_length, max(lengths)))
    else:
        bins = [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    mask = torch.zeros((len(bins), width), dtype=torch.long)
    row_index = torch.zeros(len(examples), dtype=torch.long)
    first_index = torch.zeros(len(examples), dtype=torch.long)
    last_index = torch.zeros(len(examples), dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(examples[i]["input_ids"], dtype=torch.long)
            pos[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            row_index[i], first_index[i], last_index[i] = r, at, at + n - 1
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: a block of its own
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "row_index": row_index,
        "first_index": first_index,
        "last_index": last_index,
        "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),
        "weights": torch.tensor([float(e.get("weight", 1.0)) for e in examples], dtype=torch.float32),
    }
    if not packing:
        batch["attention_mask"] = mask
    return batch


class Collator:
    def __init__(self, pad_id: int, packing: bool, max_length: int):
        self.pad_id, self.packing, self.max_length = pad_id, packing, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id, packing=self.packing, max_length=self.max_length)


# --------------------------------------------------------------------------- the model


def _unwrap(model):
    """The PeftModel / transformers model under DDP, DeepSpeed or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def head_module(model):
    """The classification head (``score``; ``classifier`` on some architectures)."""
    inner = _unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = backbone.classification_head(base)
    if head is not None:
        return head
    raise AlignError(f"{type(base).__name__} has no classification head (score/classifier); use a decoder LM")


def class_logits(model, batch: dict[str, torch.Tensor], pooling: str = "last") -> torch.Tensor:
    """(examples, classes) logits: the head's output at each example's last token
    (``pooling="last"``), or averaged over the example's tokens (``"mean"``; the head is linear,
    so this is the head applied to the mean-pooled hidden states).

    The model is called as a whole (so DDP / FSDP / DeepSpeed wrappers see the forward), and
    the head's per-token output is taken with a forward hook: transformers' own pooling reads
    the last non-pad token of each row, which is neither right for packed rows nor when the
    pad token is the EOS that ends every text.
    """
    captured: list[torch.Tensor] = []
    hook = head_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    try:
        model(**kwargs)
    finally:
        hook.remove()
    per_token = captured[-1]
    # prompt tuning runs the head over its virtual tokens too, prepended: shift past them
    offset = per_token.size(1) - batch["input_ids"].size(1)
    rows, last = batch["row_index"], batch["last_index"] + offset
    if pooling == "last":
        return per_token[rows, last].float()
    # each example sums only its own tokens (a running sum over a packed row would make its
    # mean depend, in the last bits, on what precedes it in the row)
    first = batch["first_index"] + offset
    at = torch.arange(per_token.size(1), device=per_token.device)
    own = (at >= first[:, None]) & (at <= last[:, None])  # (examples, width)
    tokens = per_token[rows].float()  # (examples, width, classes): small, classes is K
    sums = torch.where(own[..., None], tokens, 0.0).sum(1)
    return sums / own.sum(1, keepdim=True).to(sums.dtype)


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 0.0,
    class_weights: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i( c[y_i] * w_i * (1 - p_i)^gamma * -log p_i ), p_i the probability of the true class.

    gamma=0 is cross-entropy; class weights ``c`` and row weights ``w`` multiply each row's
    loss and the mean is over rows (not over the weights, as torch's ``cross_entropy(weight=)``
    does), so a batch of only up-weighted rows still counts for more.
    """
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -logp
    if gamma:
        loss = (1.0 - logp.exp()).clamp(min=0.0).pow(gamma) * loss
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device, loss.dtype)[labels]
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    return loss.mean()


def class_weights_for(spec: Any, labels: Sequence[int], num_labels: int) -> list[float] | None:
    """``classify.class_weights``: None, "auto" (``n / (K * n_k)``: the mean weight over the
    training rows is 1) or the given list."""
    from align.config import class_weights_spec

    spec = class_weights_spec(spec)
    if spec is None:
        return None
    if spec == "auto":
        counts = [0] * num_labels
        for y in labels:
            counts[y] += 1
        missing = [k for k, c in enumerate(counts) if c == 0]
        if missing:
            raise AlignError(
                f"classify.class_weights=auto: class id(s) {missing} have no training rows; give the "
                "weights as a list or add rows of every class"
            )
        return [len(labels) / (num_labels * c) for c in counts]
    if len(spec) != num_labels:
        raise AlignError(f"classify.class_weights has {len(spec)} weights for {num_labels} labels")
    return list(spec)


class ClassifierTrainer(Trainer):
    """transformers' Trainer with :func:`classification_loss` on :func:`class_logits`."""

    def __init__(
        self,
        *args,
        gamma: float = 0.0,
        class_weights: list[float] | None = None,
        pooling: str = "last",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # the loss is a mean over the micro-batch's rows, not a sum normalised by the step's item
        # count: the Trainer must divide it by the gradient accumulation steps (it would not,
        # seeing a model whose forward takes **kwargs)
        self.model_accepts_loss_kwargs = False
        self.gamma, self.pooling = gamma, pooling
        self.class_weights = torch.tensor(class_weights) if class_weights is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = class_logits(model, inputs, self.pooling)
        loss = classification_loss(
            logits,
            inputs["labels"],
            gamma=self.gamma,
            class_weights=self.class_weights,
            weights=inputs["weights"],
        )
        return (loss, logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, logits = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), None, None


@torch.no_grad()
def predict(
    model,
    enc_ids: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int,
    packing: bool,
    max_length: int,
    pooling: str = "last",
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """(rows, classes) probabilities, in the order of ``enc_ids``; batches of similar length.
    ``autocast``: the compute dtype the run trained and was scored in (bf16 autocast), so that
    stage=eval reproduces the scores and the tuned threshold of training."""
    from align.sampling import autocast_context, model_device

    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(enc_ids)), key=lambda i: len(enc_ids[i]))
    out: list[torch.Tensor | None] = [None] * len(enc_ids)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate(
                [{"input_ids": enc_ids[i], "label": 0} for i in idx],
                pad_id,
                packing=packing,
                max_length=max_length,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_context(device, autocast):
                probs = class_logits(model, batch, pooling).softmax(-1).cpu()
            for j, i in enumerate(idx):
                out[i] = probs[j]
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0, 2)


# --------------------------------------------------------------------------- metrics


def eval_loss(probs: torch.Tensor, y: Sequence[int]) -> float:
    """Mean cross-entropy (no focal term, no weights) of the predicted probabilities."""
    p = probs.float()[torch.arange(len(y)), torch.tensor(list(y), dtype=torch.long)]
    return float(-(p.clamp_min(1e-12).log()).mean())


def tuned_threshold(y: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, F1): a score threshold (predict positive at ``score >= threshold``) that
    maximises F1 on (y, scores); ties go to the higher threshold. It lies halfway between the
    lowest score predicted positive and the next lower score, so a prediction on these rows
    does not flip with a last-bit difference (another batch, a reloaded model). No positives:
    (0.5, 0)."""
    from sklearn.metrics import precision_recall_curve

    if sum(y) == 0:
        return 0.5, 0.0
    precision, recall, thresholds = precision_recall_curve(list(y), list(scores))
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with_f1 = [
        (2 * a * b / (a + b) if a + b > 0 else 0.0, float(t))
        for a, b, t in zip(p, r, thresholds, strict=True)
    ]
    best_f1, best_t = max(with_f1, key=lambda x: (x[0], x[1]))
    below = [float(x) for x in scores if x < best_t]
    threshold = (best_t + max(below)) / 2 if below else best_t
    return threshold, float(best_f1)


def _at(y: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, float]:
    from sklearn.metrics import f1_score, precision_score, recall_score

    pred = [int(s >= threshold) for s in scores]
    kw = {"zero_division": 0}
    return {
        "f1": float(f1_score(y, pred, **kw)),
        "precision": float(precision_score(y, pred, **kw)),
        "recall": float(recall_score(y, pred, **kw)),
    }


def metrics(
    y: Sequence[int], probs: torch.Tensor, labels: LabelMap, threshold: float | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """(flat ``eval/*`` metrics, details: confusion matrix and the threshold used).

    Binary: score = P(positive). F1/precision/recall at 0.5 (``eval/f1``...), and at
    ``threshold`` (``eval/f1_tuned``...; None: the F1-maximising threshold on these rows,
    which becomes ``eval/threshold``). ROC AUC and PR AUC (average precision) need both
    classes present (NaN otherwise). Multi-class: accuracy, macro-F1, one-vs-rest ROC AUC.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        f1_score,
        roc_auc_score,
    )

    y = [int(v) for v in y]
    P = probs.float().numpy()
    out: dict[str, float] = {"eval/rows": float(len(y))}
    details: dict[str, Any] = {"labels": labels.names}
    if not y:
        return out, details
    both = len(set(y)) > 1
    if labels.binary:
        scores = P[:, 1].tolist()
        if threshold is None:
            threshold, _ = tuned_threshold(y, scores)
        pred = [int(s >= threshold) for s in scores]
        out["eval/accuracy"] = float(accuracy_score(y, [int(s >= 0.5) for s in scores]))
        out["eval/accuracy_tuned"] = float(accuracy_score(y, pred))
        out["eval/roc_auc"] = float(roc_auc_score(y, scores)) if both else math.nan
        out["eval/pr_auc"] = float(average_precision_score(y, scores)) if sum(y) else math.nan
        out |= {f"eval/{k}": v for k, v in _at(y, scores, 0.5).items()}
        out |= {f"eval/{k}_tuned": v for k, v in _at(y, scores, threshold).items()}
        out["eval/threshold"] = float(threshold)
        out["eval/positive_rate"] = sum(y) / len(y)
    else:
        pred = P.argmax(1).tolist()
        out["eval/accuracy"] = float(accuracy_score(y, pred))
        out["eval/macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        present = sorted(set(y))
        if len(present) == labels.num_labels:
            out["eval/roc_auc"] = float(roc_auc_score(y, P, multi_class="ovr"))
        else:
            out["eval/roc_auc"] = math.nan
    cm = confusion_matrix(y, pred, labels=list(range(labels.num_labels))).tolist()
    details["confusion_matrix"] = cm  # rows: true class, columns: predicted class
    details["threshold"] = out.get("eval/threshold")
    for t, row in enumerate(cm):
        for p, n in enumerate(row):
            out[f"eval/confusion/{labels.names[t]}->{labels.names[p]}"] = float(n)
    return out, details


def write_predictions(
    path: Path,
    ids: Sequence[str],
    y: Sequence[int],
    probs: torch.Tensor,
    labels: LabelMap,
    threshold: float | None,
) -> None:
    from align.artifacts import write_text_atomic

    lines = []
    for rid, yt, p in zip(ids, y, probs.tolist(), strict=True):
        row: dict[str, Any] = {"id": rid, "label": labels.names[yt], "label_id": int(yt)}
        if labels.binary:
            row["score"] = round(p[1], 6)
            row["pred"] = labels.names[int(p[1] >= (0.5 if threshold is None else threshold))]
        else:
            row["scores"] = [round(x, 6) for x in p]
            row["pred"] = labels.names[max(range(len(p)), key=p.__getitem__)]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(path, "".join(x + "\n" for x in lines))


def save_curves(run_dir: Path, y: Sequence[int], scores: Sequence[float]) -> list[Path]:
    """roc.png and pr.png (binary, both classes present); the paths written."""
    if len(set(y)) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    written = []
    fpr, tpr, _ = roc_curve(y, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, label=f"AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / "roc.png")
    plt.close(fig)
    written.append(run_dir / "roc.png")
    precision, recall, _ = precision_recall_curve(y, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(recall, precision)
    ax.axhline(sum(y) / len(y), linestyle="--", color="grey", linewidth=0.8, label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(run_dir / "pr.png")
    plt.close(fig)
    written.append(run_dir / "pr.png")
    return written


def log_plots(
    tracker: Any, y: Sequence[int], probs: torch.Tensor, labels: LabelMap, pngs: list[Path]
) -> None:
    """ROC / PR curves and the confusion matrix as W&B plots (main process, W&B on)."""
    if getattr(tracker, "run", None) is None:
        return
    import wandb

    y = [int(v) for v in y]
    p = probs.float().numpy()
    logged: dict[str, Any] = {
        "eval/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=y, preds=p.argmax(1).tolist(), class_names=labels.names
        )
    }
    if len(set(y)) > 1:
        logged["eval/roc"] = wandb.plot.roc_curve(y, p, labels=labels.names)
        logged["eval/pr"] = wandb.plot.pr_curve(y, p, labels=labels.names)
    for png in pngs:
        logged[f"eval/{png.stem}_png"] = wandb.Image(str(png))
    tracker.run.log(logged)


def read_classifier(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CLASSIFIER_FILE
    if not path.is_file():
        raise AlignError(f"{run_dir}: no {CLASSIFIER_FILE}; is it the output of stage=classify?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AlignError(f"{path}: corrupt ({e})") from None


# --------------------------------------------------------------------------- stage=eval


def is_classifier_run(spec: str) -> bool:
    """Whether ``eval.model`` names a finished stage=classify run."""
    path = Path(str(spec)).expanduser() / "artifact.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("stage") == "classify"
    except (OSError, ValueError):
        return False


def evaluate_run(cfg: Any, out_dir: Path, tracker: Any) -> dict[str, Any]:
    """Score a held-out file with a stage=classify run: its label mapping, truncation and
    threshold. The file is ``data.eval`` (columns renamed by ``data.columns``; every row), else
    the held-out file that run used. Writes predictions.jsonl and roc.png/pr.png into ``out_dir``."""
    from align import artifacts, data
    from align.backbone import load_trained
    from align.evaluation import _cfg_from_run

    art = artifacts.read(cfg.eval.model, key="eval.model", expect_stage=("classify",))
    saved = read_classifier(art.run_dir)
    labels = LabelMap(list(saved["labels"]))
    source = cfg.data.eval or art.manifest.get("data", {}).get("eval")
    if not source or not Path(str(source)).is_file():
        raise AlignError(
            "stage=eval of a classifier needs a file to score: data.eval=<file> (.jsonl/.csv/...)"
        )
    # every row of the file is scored (data.max_eval_rows caps a training run's held-out split)
    rows = data.validate_rows(data.read_rows(str(source), cfg.data.split), "classify", cfg.data.columns)
    run_cfg = _cfg_from_run(cfg, art.run_dir, art.base_model)
    model, tokenizer, rt = load_trained(
        run_cfg, art.adapter_dir, task="seq_cls", num_labels=labels.num_labels, keep_layers=saved.get("layer")
    )
    enc = encode(rows, tokenizer, labels, int(saved["max_length"]), saved.get("truncate", "middle"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probs = predict(
        model,
        enc.input_ids,
        pad_id=pad_id,
        batch_size=cfg.train.eval_batch_size,
        packing=bool(saved.get("packing")),
        max_length=int(saved["max_length"]),
        pooling=saved.get("pooling", "last"),
        autocast=rt.autocast_dtype,
    )
    threshold = saved.get("threshold")
    flat, details = metrics(enc.labels, probs, labels, threshold)
    if labels.binary:
        tuned_t, tuned_f1 = tuned_threshold(enc.labels, probs[:, 1].tolist())
        at_saved = {
            k.replace("_tuned", "_saved_threshold"): v for k, v in flat.items() if k.endswith("_tuned")
        }
        flat = {k: v for k, v in flat.items() if not k.endswith("_tuned")} | at_saved
        flat |= {"eval/f1_tuned": tuned_f1, "eval/threshold_tuned_here": tuned_t}
    flat["data/truncated_rows"] = float(enc.truncated)
    write_predictions(out_dir / PREDICTIONS_FILE, enc.ids, enc.labels, probs, labels, threshold)
    pngs = save_curves(out_dir, enc.labels, probs[:, 1].tolist()) if labels.binary else []
    log_plots(tracker, enc.labels, probs, labels, pngs)
    artifacts.write_json_atomic(out_dir / "eval.json", {"metrics": flat, **details})
    return {"flat": flat, "data": {"eval": str(source), "eval_rows": len(rows)}, "model": str(art.run_dir)}
