"""The life of a run directory: where it is (one for all ranks), what a failed run leaves
(nothing half-written), and how an interrupted run is resumed in place.

* Pinning: ``resume=<dir>`` makes Hydra write into that directory; under ``accelerate
  launch`` (WORLD_SIZE > 1) rank 0 picks the timestamp and every rank uses it, so all
  ranks share one run directory.
* Failure: a run that stops with an error and no ``artifact.json`` is removed when it
  produced nothing but Hydra's bookkeeping, kept in place with ``error.txt`` when it holds
  a checkpoint (so it can be resumed), and otherwise renamed to ``<dir>.failed`` with the
  error in ``error.txt``. A finished run always has ``artifact.json``.
* Resume: the run's saved ``config.yaml`` is the config; overrides that would change it
  are refused (a few harmless ones are applied); the trainer continues from the last
  checkpoint and the W&B run with the saved id continues.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError

RUN_STATE = "run.json"
CHECKPOINTS = "checkpoints"
# keys a resumed run may change: they do not touch the optimisation
RESUME_SAFE = (
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.num_workers",
    "train.on_nan",
    "train.eval_batch_size",
    "data.max_eval_rows",
)
BOOKKEEPING = {".hydra", ".hydra-resume", "config.yaml", RUN_STATE, "wandb"}


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def output_root() -> Path:
    return Path(os.environ.get("ALIGN_OUTPUT_ROOT") or "outputs")


def main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def leave_process_group() -> None:
    """After every rank finished its work: meet, then tear the process group down.

    A rank that exits with the group still up leaves gloo's worker threads to the interpreter's
    finalisation, which now and then aborts it ("terminate called without an active exception",
    SIGABRT) after a run that succeeded. Called on success only: a rank that failed may leave
    the others inside a collective, where a barrier would hang.
    """
    dist = sys.modules.get("torch.distributed")  # nothing to do (and no torch import) otherwise
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- checkpoints


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Saved trainer checkpoints of a run, oldest first."""
    d = Path(run_dir) / CHECKPOINTS
    found = [p for p in d.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


# --------------------------------------------------------------------------- one run dir for all ranks


def _arg(args: list[str], key: str) -> str | None:
    for a in args:
        if a.startswith(f"{key}="):
            return a.split("=", 1)[1]
    return None


def find_resumable(stage: str) -> Path:
    """``resume=auto``: the latest unfinished run of ``stage`` with a checkpoint under the outputs root."""
    base = output_root() / stage
    runs = [
        d
        for d in base.glob("*")
        if d.is_dir() and not (d / "artifact.json").exists() and last_checkpoint(d) is not None
    ]
    if not runs:
        raise AlignError(
            f"resume=auto: no unfinished {stage} run with a checkpoint under {base}; "
            f"give the run directory: resume=<dir>"
        )
    return max(runs, key=lambda d: last_checkpoint(d).stat().st_mtime)


def check_resumable(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise AlignError(f"resume={run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise AlignError(f"resume={run_dir}: not an align run directory (no config.yaml)")
    if (run_dir / "artifact.json").is_file():
        raise AlignError(
            f"resume={run_dir}: that run finished (it has artifact.json); nothing to resume. "
            "To train further start a new run from it (e.g. dpo.init=<dir>)"
        )
    if last_checkpoint(run_dir) is None:
        raise AlignError(
            f"resume={run_dir}: the run has no checkpoint in {run_dir / CHECKPOINTS} "
            "(checkpoints are written every train.save_steps steps and on SIGTERM/SIGINT)"
        )


def check_ranks_fit_gpus() -> None:
    """Under a launcher, more processes on this machine than visible GPUs would put two ranks on
    one GPU, which NCCL refuses deep inside the first collective ("Duplicate GPU detected")."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < local:
        raise AlignError(
            f"{local} processes on this machine but {gpus} visible GPU(s): each rank needs a GPU of its "
            f"own; launch --num_processes {gpus}, or run the ranks on the CPU with CUDA_VISIBLE_DEVICES= "
            "(as conf/accelerate/cpu.yaml does on a CPU-only machine)"
        )


def _shared_stamp() -> str:
    """A timestamp every rank agrees on: ALIGN_RUN_ID, else rank 0's, broadcast."""
    check_ranks_fit_gpus()
    if os.environ.get("ALIGN_RUN_ID"):
        return os.environ["ALIGN_RUN_ID"]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # joins the process group accelerate/torchrun set up (gloo on CPU, nccl on GPU)
    if dist.is_available() and dist.is_initialized():
        box = [stamp]
        dist.broadcast_object_list(box, src=0)
        stamp = box[0]
    return stamp


def pin_run_dir(args: list[str]) -> list[str]:
    """Command-line overrides with ``hydra.run.dir`` pinned for resume and multi-process runs."""
    resume = _arg(args, "resume")
    stage = _arg(args, "stage") or "dpo"
    if resume and resume != "null":
        target = find_resumable(stage) if resume == "auto" else Path(resume).expanduser()
        check_resumable(target)
        rest = [a for a in args if not a.startswith(("hydra.run.dir=", "resume=", "hydra.output_subdir="))]
        return [*rest, f"resume={target.resolve()}", f"hydra.run.dir={target.resolve()}",
                "hydra.output_subdir=.hydra-resume"]  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        has_run, has_sweep = _arg(args, "hydra.run.dir"), _arg(args, "hydra.sweep.dir")
        if has_run and (has_sweep or "-m" not in args and "--multirun" not in args):
            return args
        stamp = _shared_stamp()
        extra = [] if has_run else [f"hydra.run.dir={output_root() / stage / stamp}"]
        extra += [] if has_sweep else [f"hydra.sweep.dir={output_root() / 'multirun' / stage / stamp}"]
        return [*args, *extra]
    return args


# --------------------------------------------------------------------------- resume


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def resume_config(cfg: Any, explicit: list[str]) -> Any:
    """The saved config of the run in ``cfg.resume``, with the overrides the user gave checked.

    ``explicit`` is the list of command-line overrides (``key=value``). Those that would
    change the saved config are refused, except :data:`RESUME_SAFE` keys, which apply.
    """
    from omegaconf import OmegaConf

    from align.config import AlignConfig
    from align.tracking import config_dict

    run_dir = Path(cfg.resume)
    check_resumable(run_dir)
    saved_plain = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    saved = OmegaConf.merge(OmegaConf.structured(AlignConfig), saved_plain)
    now, before = _flat(config_dict(cfg)), _flat(config_dict(saved))
    keys = [o.split("=", 1)[0].lstrip("+~") for o in explicit if "=" in o]
    keys = [k for k in keys if k != "resume" and not k.startswith("hydra")]
    conflicts, applied = [], []
    for k in sorted(now):
        if now[k] == before.get(k) or k == "resume":
            continue
        named = any(k == x or k.startswith(x + ".") for x in keys)
        if not named:
            continue  # a default that differs (e.g. the default stage group): the run's value wins
        if k in RESUME_SAFE:
            OmegaConf.update(saved, k, OmegaConf.select(cfg, k), merge=False)
            applied.append(f"{k}={now[k]}")
        elif k.startswith("tracking.") and before.get("tracking.mode") == now.get("tracking.mode"):
            continue
        else:
            conflicts.append(f"{k}={now[k]} (the run has {before.get(k)})")
    if conflicts:
        raise AlignError(
            f"resume={run_dir}: a resumed run keeps its config, but these overrides change it: "
            f"{'; '.join(conflicts)}. Drop them, or start a new run (only {', '.join(RESUME_SAFE)} may change)"
        )
    if applied and main_process():
        print(f"align: resume: applying {', '.join(applied)}", flush=True)
    saved.resume = str(run_dir)
    return saved


@dataclass
class ResumeState:
    checkpoint: str | None = None
    wandb_id: str | None = None


def resume_state(cfg: Any, run_dir: Path) -> ResumeState:
    """What a run continues from: its last checkpoint and W&B run id (nothing for a fresh run)."""
    import json

    if not getattr(cfg, "resume", None):
        return ResumeState()
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        raise AlignError(f"resume={run_dir}: no checkpoint to resume from")
    state = {}
    if (run_dir / RUN_STATE).is_file():
        state = json.loads((run_dir / RUN_STATE).read_text())
    if main_process():
        print(f"align: resuming {run_dir} from {ckpt.name}", flush=True)
    return ResumeState(str(ckpt), (state.get("tracking") or {}).get("id"))


def record_start(cfg: Any, run_dir: Path, tracker: Any) -> None:
    """config.yaml (what resume reads) and run.json (W&B id, status) at the start of a run."""
    from omegaconf import OmegaConf

    from align.artifacts import write_json_atomic
    from align.tracking import config_dict

    if not main_process():
        return
    OmegaConf.save(OmegaConf.create(config_dict(cfg)), run_dir / "config.yaml")
    write_json_atomic(
        run_dir / RUN_STATE,
        {"stage": cfg.stage, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tracking": tracker.info},
    )


# --------------------------------------------------------------------------- failure


def mark_failed(run_dir: str | Path, err: BaseException, *, with_traceback: bool = False) -> str:
    """Leave no half-written run behind; returns a sentence saying what happened to the directory."""
    from align.secrets import redact_text

    run_dir = Path(run_dir)
    if not main_process() or not run_dir.is_dir() or (run_dir / "artifact.json").exists():
        return ""
    text = f"{type(err).__name__}: {err}\n"
    if with_traceback:
        text += "".join(traceback.format_exception(err))
    text = redact_text(text)
    produced = [p for p in run_dir.iterdir() if p.name not in BOOKKEEPING and not p.name.endswith(".log")]
    if last_checkpoint(run_dir) is not None:
        (run_dir / "error.txt").write_text(text)
        return f"error in {run_dir / 'error.txt'}; its last checkpoint is kept: resume with python -m align resume={run_dir}"
    if not produced and not with_traceback:  # nothing but Hydra's records: leave no trace
        shutil.rmtree(run_dir, ignore_errors=True)
        return ""
    target = run_dir.with_name(run_dir.name + ".failed")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.failed{n}")
    os.replace(run_dir, target)
    (target / "error.txt").write_text(text)
    return f"partial outputs moved to {target} (see error.txt)"
