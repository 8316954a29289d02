"""RLHF: sft -> rm -> ppo in one command.

Each sub-stage runs exactly as ``python -m align stage=<name>`` would, into ``<run dir>/<name>/``
(its own artifact.json, metrics and W&B run), and reads the previous stage's artifact: ppo
starts from the sft adapter (also its reference) and scores with the rm adapter. The W&B runs
share one group (tracking.group, default: the rlhf run's name).

Settings per sub-stage: ``rlhf.<name>.*`` is that stage's ``train.*`` (e.g.
``rlhf.sft.max_steps=10``), ``rlhf.<name>_data`` its ``data.train``; the stage's own keys
are the usual ``sft.*`` / ``rm.*`` / ``ppo.*`` (e.g. ``ppo.kl_coef=0.1``). A top-level
``train.*`` is not used by stage=rlhf.

Each sub-stage loads the base model itself: a reload from the converted safetensors cache
takes about a second for the embedded model, and the rm stage needs the sequence-classification
class anyway, so keeping one instance alive across TRL's trainers is not worth the coupling.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from align import artifacts
from align.training import StageContext


def stage_config(cfg: Any, name: str, group: str, done: dict[str, Any]) -> Any:
    """The config sub-stage ``name`` runs with."""
    sub = copy.deepcopy(cfg)
    sub.stage = name
    sub.train = copy.deepcopy(cfg.rlhf[name])
    data_file = cfg.rlhf[f"{name}_data"]
    if data_file:
        sub.data.train = data_file
        sub.data.eval = None
    sub.tracking.group = group
    sub.tracking.name = f"{group}-{name}"
    if name == "rm" and "sft" in done and cfg.rlhf.rm_from_sft and not cfg.rm.init:
        sub.rm.init = str(done["sft"])  # InstructGPT: the reward model starts from the SFT model
    if name == "ppo":
        if "sft" in done:
            sub.ppo.policy = str(done["sft"])
        if "rm" in done:
            sub.ppo.reward = str(done["rm"])
    return sub


def run(ctx: StageContext) -> dict[str, float]:
    from align.stages import execute
    from align.tracking import is_main_process

    cfg = ctx.cfg
    group = cfg.tracking.group or ctx.tracker.info.get("name") or f"rlhf-{time.strftime('%Y%m%d-%H%M%S')}"
    # every sub-stage opens its own W&B run; this one only records the chain's config
    ctx.tracker.finish()
    done: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for name in cfg.rlhf.stages:
        sub = stage_config(cfg, name, group, done)
        out = execute(sub, ctx.run_dir / name)
        done[name] = ctx.run_dir / name
        metrics |= {f"{name}/{k}": v for k, v in out.items()}
    metrics["time/wall_s"] = round(time.time() - ctx.started, 1)
    last = cfg.rlhf.stages[-1]
    if is_main_process():
        artifacts.write_json_atomic(ctx.run_dir / "metrics.json", metrics)
        artifacts.write_manifest(
            ctx.run_dir,
            stage="rlhf",
            cfg=cfg,
            adapter_path=f"{last}/adapter",
            data={"stages": {k: str(v) for k, v in done.items()}, "group": group},
            metrics=metrics,
            tracking={"group": group, "mode": ctx.tracker.mode},
        )
        print(
            f"\nalign: stage=rlhf finished: {', '.join(f'{k} -> {v}' for k, v in done.items())}", flush=True
        )
    return metrics
