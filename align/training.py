"""What every training stage shares: the run context, the TRL arguments built from
``train.*``, the final evaluation, and writing the run's outputs and summary."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from align import artifacts, hardware, malloc
from align.errors import AlignError
from align.tracking import Tracker, config_dict, is_main_process

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


@dataclass
class StageContext:
    cfg: Any
    run_dir: Path
    tracker: Tracker
    started: float = field(default_factory=time.time)
    resume_from: str | None = None  # a checkpoint to continue from (resume=<run dir>)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def needed_train_rows(cfg: Any) -> int | None:
    """Rows a run with ``train.max_steps`` will consume (None: a whole number of epochs)."""
    t = cfg.train
    if t.max_steps <= 0:
        return None
    return t.max_steps * t.batch_size * t.grad_accum * world_size()


def load_data(cfg: Any, kind: str, needed_train_rows: int | None, *, as_dataset: bool = True):
    """The stage's validated rows (``data.load``), prompts checked against ``model.max_length``
    with the model's tokenizer: a longer one is an error, or dropped with ``data.on_error=skip``.
    ``as_dataset=False``: lists of dicts, for a stage that only iterates its rows."""
    from align import backbone, data

    tokenizer = backbone.tokenizer_for(cfg)
    split = data.load(
        cfg.data,
        kind,
        seed=cfg.seed,
        needed_train_rows=needed_train_rows,
        tokenizer=tokenizer,
        max_length=cfg.model.max_length,
        as_dataset=as_dataset,
    )
    if cfg.data.get("replay") and kind == "sft":
        split = data.mix_replay(
            split,
            cfg.data,
            seed=cfg.seed,
            fixed_budget=needed_train_rows is not None,
            tokenizer=tokenizer,
            max_length=cfg.model.max_length,
        )
        if is_main_process():
            import sys

            print(f"align: data: replay: {data.replay_line(split.info)}", file=sys.stderr, flush=True)
    return split


def init_run(cfg: Any, key: str, expect: tuple[str, ...]) -> artifacts.Artifact | None:
    """The finished run that ``<key>`` (e.g. ``kto.init``) names, checked: one of the stages
    ``expect`` on this base model, trained with this run's method (:func:`check_init_kind`);
    None when the key is unset (start from the base)."""
    value = OmegaConf.select(cfg, key)
    if not value:
        return None
    init = artifacts.read(value, key=key, expect_stage=expect, base_model=cfg.model.name_or_path)
    check_init_kind(cfg, init, key)
    return init


def check_init_kind(cfg: Any, init: Any, key: str) -> None:
    """A run continued from ``init`` (dpo.init, ...) must use the method ``init`` was trained with
    (the LoRA family is interchangeable), so its artifact records what it really trained."""
    from align.config import LORA_KINDS, adapter_kind

    have = init.adapter_kind
    want = adapter_kind(cfg.adapter)
    if have == want or (have in LORA_KINDS and want in LORA_KINDS):
        return
    if have == "none":
        raise AlignError(
            f"{key}={init.run_dir}: was a full fine-tune (adapter=none); export it (stage=export) and use "
            "its model as model.name_or_path"
        )
    raise AlignError(
        f"{key}={init.run_dir}: was trained with adapter={have}, but this run has adapter={want}; "
        f"set adapter={have} to continue it"
    )


def init_reference(cfg: Any, bb: Any, init: artifacts.Artifact | None) -> Any:
    """The frozen reference model of a preference stage with a reference (dpo, kto) that continues
    ``init`` with a policy that is no peft model (adapter=freeze from a freeze run): that run's
    model, where TRL would reload the base. None otherwise: TRL disables the policy's adapter, or
    reloads the base (no init)."""
    if init is None or bb.peft_config is not None or hasattr(bb.model, "peft_config"):
        return None
    from align import backbone

    ref_model, _, _ = backbone.load_trained(cfg, init.adapter_dir)
    return ref_model.requires_grad_(False)


def trainer_args(ctx: StageContext, runtime: Any, *, has_eval: bool, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments shared by every TRL config (SFTConfig, DPOConfig, ...); ``overrides``
    replace the shared ones a stage must set its own way (KTO: ``train_sampling_strategy``)."""
    from align import guard  # checkpointing and non-finite handling

    t = ctx.cfg.train
    periodic_eval = has_eval and t.eval_steps > 0
    args = dict(
        output_dir=str(ctx.run_dir / "checkpoints"),
        learning_rate=t.lr,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=t.eval_steps if periodic_eval else None,
        **guard.trainer_kwargs(ctx.cfg),
        report_to=ctx.tracker.report_to,
        run_name=ctx.tracker.info.get("name"),
        seed=ctx.cfg.seed,
        data_seed=ctx.cfg.seed,
        dataloader_num_workers=t.num_workers,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        disable_tqdm=False,
        **runtime.trainer_kwargs(),
    )
    return args | overrides


def evaluate(trainer: Any) -> dict[str, float]:
    """Held-out metrics of the trained model (an empty dict when there is no held-out set)."""
    if trainer.eval_dataset is None:
        return {}
    from align import backbone

    backbone.release_host_memory()  # glibc: the training steps' freed pages, before eval allocates anew
    raw = trainer.evaluate()
    return {k.replace("eval_", "eval/", 1): float(v) for k, v in raw.items() if isinstance(v, int | float)}


def train_metrics(trainer: Any, since: float | None = None) -> dict[str, float]:
    """The last logged training values (loss and the trainer's own metrics); with ``since``
    (a ``time.perf_counter()`` taken before the trainer was built) also ``time/train_s``."""
    out: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, int | float) and not k.startswith("eval_") and k not in ("epoch", "step"):
                out[f"train/{k}"] = float(v)
    out["train/global_step"] = float(trainer.state.global_step)
    first = next((e["loss"] for e in trainer.state.log_history if "loss" in e), None)
    if first is not None:
        out["train/first_loss"] = float(first)
    if since is not None:
        out["time/train_s"] = round(time.perf_counter() - since, 2)
    return out


def train_and_finish(
    ctx: StageContext,
    trainer: Any,
    *,
    tokenizer: Any,
    data_info: dict[str, Any],
    headline: list[str],
    started: float,
    lineage: dict[str, Any] | None = None,
    **collapse: Any,
) -> dict[str, float]:
    """The end of a TRL stage's recipe: train under align.guard (checkpoints, SIGTERM/SIGINT,
    non-finite steps, resume; with ``beta=`` or ``reference_free=True`` the collapse check),
    evaluate on the held-out rows, save the adapter and the artifact."""
    from align import guard

    guard.train(ctx, trainer, **collapse)
    metrics = train_metrics(trainer, since=started) | evaluate(trainer)
    return finish(
        ctx,
        model=trainer.model,
        tokenizer=tokenizer,
        metrics=metrics,
        data_info=data_info,
        headline=headline,
        lineage=lineage,
    )


def finish(
    ctx: StageContext,
    *,
    model: Any,
    tokenizer: Any,
    metrics: dict[str, float],
    data_info: dict[str, Any],
    headline: list[str],
    next_hint: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Save the adapter, metrics.json, config.yaml and artifact.json (last); print the summary.

    ``model=None`` (stage=eval): nothing to save, the manifest has no adapter."""
    from align import backbone

    run_dir = ctx.run_dir
    elapsed = time.time() - ctx.started
    metrics = {**metrics, "time/wall_s": round(elapsed, 1), **hardware.gpu_peak_memory()}
    adapter_info = None
    if model is not None:
        adapter_info = {"trainable_params": trainable_params(model)}
        metrics["model/trainable_params"] = float(adapter_info["trainable_params"])
    if is_main_process():
        if model is not None:
            backbone.save_adapter(model, tokenizer, run_dir / ADAPTER_DIR)
            adapter_info["size_bytes"] = weights_bytes(run_dir / ADAPTER_DIR)
            metrics["model/adapter_bytes"] = float(adapter_info["size_bytes"])
        OmegaConf.save(OmegaConf.create(config_dict(ctx.cfg)), run_dir / "config.yaml")
        artifacts.write_json_atomic(run_dir / "metrics.json", metrics)
        write_curves(ctx)
        ctx.tracker.summary(metrics)
        artifacts.write_manifest(
            run_dir,
            stage=ctx.cfg.stage,
            cfg=ctx.cfg,
            adapter_path=ADAPTER_DIR if model is not None else None,
            data=data_info | (lineage or {}),
            metrics=metrics,
            tracking=ctx.tracker.info | {"mode": ctx.tracker.mode},
            adapter_info=adapter_info,
        )
        print(summary_text(ctx, metrics, headline, elapsed, next_hint, data_info), flush=True)
    return metrics


def trainable_params(model: Any) -> int:
    """Parameters that trained: requires_grad ones (TRL's frozen reference adapter copy excluded)."""
    return int(sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".ref." not in n))


def weights_bytes(directory: Path) -> int:
    """Bytes of the saved weights (safetensors files) in ``directory``: the adapter's size on disk."""
    return int(sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")))


def write_curves(ctx: StageContext) -> Path | None:
    """curves.png from the run's log_history.json (every training stage writes one; stage=eval
    does not): loss and the signals its metric names carry (align.plots). A failure to draw is
    one warning line, never the end of the run."""
    import json

    from align import plots

    history_file = ctx.run_dir / "log_history.json"
    if not history_file.is_file():
        return None

    def draw() -> Path | None:
        history = json.loads(history_file.read_text())
        return plots.curves(
            history, ctx.run_dir / plots.CURVES_PNG, title=f"stage={ctx.cfg.stage}  {ctx.run_dir.name}"
        )

    return plots.safely(plots.CURVES_PNG, draw)


def _fmt(v: float) -> str:
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.3e}"
    return f"{v:.4f}" if isinstance(v, float) and not v.is_integer() else f"{v:g}"


def summary_text(
    ctx: StageContext,
    metrics: dict,
    headline: list[str],
    elapsed: float,
    next_hint: str | None,
    data_info: dict[str, Any] | None = None,
) -> str:
    m, s = divmod(int(math.ceil(elapsed)), 60)
    lines = [
        "",
        f"align: stage={ctx.cfg.stage} finished in {m}m{s:02d}s",
        f"  outputs  {ctx.run_dir}",
    ]
    if (ctx.run_dir / ADAPTER_DIR).is_dir():
        lines.append(f"  adapter  {ctx.run_dir / ADAPTER_DIR}")
    if (ctx.run_dir / "report.md").is_file():
        lines.append(f"  report   {ctx.run_dir / 'report.md'}")
    from align import plots

    for name in (plots.CURVES_PNG, plots.EVAL_PNG):
        if (ctx.run_dir / name).is_file():
            lines.append(f"  chart    {ctx.run_dir / name}")
    if data_info and "format" in data_info:  # what data.load detected and converted
        from align.data import format_line

        lines.append(f"  data     {format_line(data_info)}")
    if data_info and "replay" in data_info:  # data.replay: general rows mixed in
        from align.data import replay_line

        lines.append(f"  replay   {replay_line(data_info)}")
    shown = [k for k in headline if k in metrics]
    if shown:
        lines.append("  metrics  " + "  ".join(f"{k}={_fmt(metrics[k])}" for k in shown))
    lines.append(f"           (all metrics: {ctx.run_dir / 'metrics.json'})")
    lines.append(f"  malloc   {malloc.summary_line()}")
    if "memory/gpu_peak_allocated_gb" in metrics:
        lines.append(
            f"  gpu      {hardware.gpu_name()}, peak {metrics['memory/gpu_peak_allocated_gb']:.2f} GB "
            f"allocated ({metrics['memory/gpu_peak_reserved_gb']:.2f} GB reserved)"
        )
    hint = ctx.tracker.sync_hint
    if ctx.tracker.mode == "offline" and hint:
        lines.append(f"  W&B      offline run; upload it with: {hint}")
    elif ctx.tracker.mode == "online" and hint:
        lines.append(f"  W&B      {hint}")
    else:
        lines.append("  W&B      disabled")
    if next_hint:
        lines.append(f"  next     {next_hint}")
    return "\n".join(lines)
