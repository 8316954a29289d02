"""Charts a run leaves behind: ``curves.png`` (every training run, from log_history.json) and
``eval.png`` (stage=eval: per-instruction-type accuracy of each model next to the base).

Panels are chosen by the metric names a run logged, not by its stage, so a new stage whose
trainer logs ``rewards/accuracies``, ``objective/kl``, ``entropy``, ... gets sensible curves
without a change here. Drawing goes through matplotlib's Agg canvas directly (no pyplot, no
display, no global backend switch). A chart is a by-product: :func:`safely` turns any error
while drawing into one warning line, and the run goes on.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"
EVAL_PNG = "eval.png"

# (panel title, metric names it shows), in the order shown; at most MAX_PANELS with data.
# A held-out value logged as ``eval_<name>`` goes into the panel of ``<name>``.
PANELS: list[tuple[str, str]] = [
    ("loss", r"loss|loss/\w+|nll_loss"),
    ("preference accuracy", r"rewards/accuracies|accuracy"),  # DPO/ORPO/SimPO/CPO; RM
    ("reward margin", r"rewards/margins|margin"),
    (
        "score / reward",
        r"objective/scores|objective/rlhf_reward|reward|rewards/chosen|rewards/rejected|mean_reward",
    ),
    ("KL", r"objective/kl|kl"),  # PPO, GRPO/RLOO (beta > 0), KTO
    ("entropy", r"entropy|objective/entropy|policy/entropy"),
    ("classification", r"roc_auc|pr_auc|f1|macro_f1"),
    ("token accuracy", r"mean_token_accuracy"),  # SFT (and what DPO logs alongside)
]
MAX_PANELS = 6


def safely(what: str, draw: Callable[[], Path | None]) -> Path | None:
    """``draw()``, or None and one warning line when it fails: a chart never ends a run."""
    try:
        return draw()
    except Exception as e:  # noqa: BLE001 - any plotting failure is only worth a warning
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        log.warning("align: %s not written (%s: %s); the run is unaffected", what, type(e).__name__, msg)
        return None


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(history: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{panel: {label: (steps, values)}}`` from log_history entries. ``step`` is the x axis
    (an entry without one, as align's PPO writes them, is step ``index + 1``); the end-of-training
    summary entry (``train_runtime``, ``train_loss``) is left out."""
    compiled = [(title, re.compile(rf"^(?:{pat})$")) for title, pat in PANELS]
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or "train_runtime" in entry:
            continue
        step = entry.get("step", i + 1)
        if not _numeric(step):
            continue
        for key, value in entry.items():
            if not _numeric(value):
                continue
            name, label = key, key
            if key.startswith("eval_"):
                name, label = key[len("eval_") :], f"held-out {key[len('eval_') :]}"
            for title, rx in compiled:
                if rx.match(name):
                    xs, ys = out.setdefault(title, {}).setdefault(label, ([], []))
                    xs.append(float(step))
                    ys.append(float(value))
                    break
    order = [t for t, _ in PANELS]
    return {t: out[t] for t in order if t in out}


def _save(fig: Any, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written to a temporary name and renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Write the training curves of ``history`` (log_history.json's list) to ``path``;
    None (nothing written) when no entry holds a metric any panel shows."""
    from matplotlib.figure import Figure

    panels = list(series(history).items())[:MAX_PANELS]
    if not panels:
        return None
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, lines) in zip(axes, panels, strict=False):
        for label, (xs, ys) in sorted(lines.items()):
            held_out = label.startswith("held-out")
            ax.plot(
                xs,
                ys,
                marker="o" if held_out or len(xs) < 20 else None,
                markersize=3,
                linestyle="--" if held_out else "-",
                label=label,
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


def per_type_chart(
    per_type: dict[str, dict[str, dict[str, Any]]],
    path: str | Path,
    title: str = "",
    n_prompts: int | None = None,
) -> Path | None:
    """Grouped horizontal bars: per instruction type, the strict instruction-level accuracy of
    each model (``per_type`` maps a model's label to ifeval_metrics' per-type dict; the first
    label is drawn first, so put the base there). None when there is no type to show."""
    from matplotlib.figure import Figure

    labels = [k for k, v in per_type.items() if v]
    kinds = sorted({kind for k in labels for kind in per_type[k]})
    if not kinds:
        return None
    n = len(labels)
    height = 0.8 / n
    fig = Figure(figsize=(8.0, 1.0 + 0.28 * len(kinds) * max(n, 2)), layout="constrained")
    ax = fig.subplots()
    for j, label in enumerate(labels):
        ys = [i - 0.4 + (j + 0.5) * height for i in range(len(kinds))]  # first label on top
        acc = [100 * per_type[label].get(k, {}).get("instruction_accuracy", math.nan) for k in kinds]
        ax.barh(ys, acc, height=height * 0.95, label=label)
        for y, a in zip(ys, acc, strict=True):  # the number, so a 0% bar is seen too
            if not math.isnan(a):
                ax.text(a + 1, y, f"{a:.0f}%", va="center", fontsize=6)
    counts = {k: max(per_type[lb].get(k, {}).get("instructions", 0) for lb in labels) for k in kinds}
    ax.set_yticks(range(len(kinds)), [f"{k} ({counts[k]})" for k in kinds], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("strict instruction-level accuracy (%); (n) = instructions of that type", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    suffix = f" ({n_prompts} prompts)" if n_prompts else ""
    ax.set_title((title or "per instruction type") + suffix, fontsize=10)
    return _save(fig, Path(path))
