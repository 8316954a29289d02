"""Weights & Biases: one run per stage, offline by default (no account needed).

Only the main process logs. TRL's trainers log their own train/eval metrics through the
W&B callback of transformers, which reuses the run started here.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from align.config import TrackingMode


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (Enums as strings), for W&B and config.yaml; secrets masked."""
    from align.secrets import redact

    return redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


@dataclass
class Tracker:
    mode: str
    run: Any = None  # wandb.sdk.wandb_run.Run, or None when disabled / not the main process
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def report_to(self) -> list[str]:
        """What to give a transformers/TRL config's ``report_to``."""
        return ["wandb"] if self.run is not None else []

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def image(self, name: str, path: str | Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    @property
    def sync_hint(self) -> str | None:
        if self.mode == TrackingMode.offline.value and self.info.get("dir"):
            return f"wandb sync {self.info['dir']}"
        if self.mode == TrackingMode.online.value:
            return self.info.get("url")
        return None


def start(cfg: Any, stage: str, run_dir: Path, resume_id: str | None = None) -> Tracker:
    """Open the stage's W&B run; ``resume_id`` (resume=<run dir>) continues that run."""
    mode = TrackingMode(cfg.tracking.mode).value
    if mode == TrackingMode.disabled.value or not is_main_process():
        # transformers' W&B callback must not start a run of its own either
        os.environ["WANDB_DISABLED"] = "true"
        return Tracker(mode=TrackingMode.disabled.value)
    import wandb

    from align.secrets import MASK, redact

    t = OmegaConf.create(config_dict(cfg)["tracking"])  # secrets masked (a token pasted into a tag...)
    wandb_dir = Path(t.dir or run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    name = t.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    silent = mode == TrackingMode.offline.value
    if hasattr(wandb, "termsetup"):
        # a run's `silent` setting does not reach W&B's console functions, which then print e.g.
        # "URL not available in offline run" whenever TRL writes a model card; apply it there too
        wandb.termsetup(wandb.Settings(silent=silent), None)
    try:
        run = wandb.init(
            mode=mode,
            project=t.project,
            entity=t.entity,
            group=t.group,
            name=name,
            tags=[x for x in redact([stage, cfg.model.name, cfg.adapter.kind.value, *t.tags]) if x != MASK],
            id=resume_id,
            resume="allow" if resume_id else None,
            job_type=stage,
            dir=str(wandb_dir),
            config=config_dict(cfg) | {"run_dir": str(run_dir)},
            settings=wandb.Settings(silent=silent),
        )
        if hasattr(wandb, "termsetup"):  # wandb.init's first setup reset the console functions
            wandb.termsetup(wandb.Settings(silent=silent), None)
    except Exception as e:  # e.g. online without credentials
        from align.errors import AlignError

        raise AlignError(
            f"tracking.mode={mode}: W&B could not start a run ({e}). Run `wandb login`, or use "
            "tracking=offline (sync later) or tracking=disabled"
        ) from None
    info = {"id": run.id, "name": run.name, "project": t.project, "dir": str(Path(run.dir).parent)}
    if mode == TrackingMode.online.value:
        info["url"] = run.url
    return Tracker(mode=mode, run=run, info=info)


# --------------------------------------------------------------------------- reading runs back


def _records(path: Path):
    """Raw records of a W&B ``.wandb`` transaction log (LevelDB log framing after a 7-byte header)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> dict[str, Any]:
    """History rows, final summary and config of an offline W&B run directory
    (``.../wandb/offline-run-*``), read from its ``.wandb`` file. For tests and audits.

    W&B's service process may still be writing the file when ``finish()`` has returned;
    this waits up to ``wait_s`` for the run's closing ``exit`` record."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse_run_file(files[0])
        if out["complete"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse_run_file(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    complete = False
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        complete = complete or kind == "exit"
        if kind == "history":
            history.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "summary":
            for i in rec.summary.update:
                key = "/".join(i.nested_key) or i.key
                if key:
                    summary[key] = json.loads(i.value_json)
        elif kind in ("config", "run"):  # the run record carries the config given to wandb.init
            updates = rec.config.update if kind == "config" else rec.run.config.update
            for i in updates:
                config["/".join(i.nested_key) or i.key] = json.loads(i.value_json)
    return {"history": history, "summary": summary, "config": config, "complete": complete}
