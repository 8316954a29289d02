"""What a stage leaves behind, and how the next stage finds it.

A finished run directory holds ``artifact.json`` (written last, atomically: its presence
means the run completed), ``metrics.json``, the resolved ``config.yaml`` and the trained
``adapter/`` (with the tokenizer). A later stage is pointed at the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from align import hardware
from align.errors import AlignError

MANIFEST = "artifact.json"
FORMAT = "align-artifact/1"
TRACKED_PACKAGES = ("align", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success it
    replaces ``target`` (a stale one included), on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict[str, str]:
    out = {}
    for pkg in TRACKED_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    """The commit of the align checkout that ran (with '+dirty' for local changes), if any."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


@dataclass
class Artifact:
    """A finished stage's output, as read back from its directory."""

    run_dir: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def adapter_dir(self) -> Path | None:
        rel = self.manifest.get("adapter", {}).get("path")
        return self.run_dir / rel if rel else None

    @property
    def adapter_kind(self) -> str:
        """The fine-tuning method the run used (lora, qlora, dora, none, freeze, prefix, prompt, ia3)."""
        return (self.manifest.get("adapter") or {}).get("kind") or "lora"

    def require_kind(self, key: str, allowed: tuple[str, ...], instead: str) -> None:
        """Refuse (before any model loads) a run whose method ``key`` cannot use."""
        if self.adapter_kind not in allowed:
            raise AlignError(
                f"{key}={self.run_dir}: was trained with adapter={self.adapter_kind}, which {key} cannot use; "
                f"{instead}"
            )

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]["name_or_path"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


def write_manifest(
    run_dir: Path,
    *,
    stage: str,
    cfg: Any,
    adapter_path: str | None,
    data: dict,
    metrics: dict,
    tracking: dict | None = None,
    adapter_info: dict | None = None,
) -> Path:
    from align.config import adapter_kind  # here: importing align.artifacts stays free of hydra

    a = cfg.adapter
    kind = adapter_kind(a)
    method: dict[str, Any] = {}
    if kind == "freeze":
        method = {"train_layers": a.get("train_layers"), "train_head": a.get("train_head")}
    elif kind in ("prefix", "prompt"):
        method = {"num_virtual_tokens": a.get("num_virtual_tokens")}
        if kind == "prompt" and a.get("prompt_init"):
            method["prompt_init"] = a.get("prompt_init")
    manifest = {
        "format": FORMAT,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {
            "name": cfg.model.name,
            "name_or_path": cfg.model.name_or_path,
            "revision": cfg.model.revision,
        },
        "adapter": {
            "path": adapter_path,
            "kind": kind,
            "r": a.r,
            "alpha": a.alpha,
            "bits": a.bits,
            **method,
            **(adapter_info or {}),
        },
        "data": data,
        "metrics": metrics,
        "tracking": tracking or {},
        "versions": versions(),
        "hardware": hardware.describe(),
        "git_revision": git_revision(),
        "seed": cfg.seed,
    }
    path = Path(run_dir) / MANIFEST
    from align.secrets import redact

    write_json_atomic(path, redact(manifest))
    return path


def add_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge ``metrics`` into a finished run's metrics.json and artifact.json (e.g. the
    train.eval_at_end report, computed after the stage wrote its artifact)."""
    from align.secrets import redact

    run_dir = Path(run_dir)
    for name in ("metrics.json", MANIFEST):
        path = run_dir / name
        obj = json.loads(path.read_text(encoding="utf-8"))
        if name == MANIFEST:
            obj["metrics"] = {**obj.get("metrics", {}), **metrics}
        else:
            obj = {**obj, **metrics}
        write_json_atomic(path, redact(obj))


def read(
    run_dir: str | Path,
    *,
    key: str,
    expect_stage: tuple[str, ...] | None = None,
    base_model: str | None = None,
) -> Artifact:
    """Read an earlier stage's output. ``key`` is the config key that named it (for messages)."""
    d = Path(run_dir).expanduser()
    if not d.is_dir():
        raise AlignError(f"{key}={run_dir}: no such directory")
    path = d / MANIFEST
    if not path.is_file():
        raise AlignError(
            f"{key}={run_dir}: not a finished align run (no {MANIFEST}); point it at a run directory "
            "such as outputs/sft/<timestamp>"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AlignError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise AlignError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {FORMAT})")
    art = Artifact(d, manifest)
    if expect_stage and art.stage not in expect_stage:
        raise AlignError(
            f"{key}={run_dir}: is the output of stage={art.stage}; expected {' or '.join(expect_stage)}"
        )
    if base_model is not None and art.base_model != base_model:
        raise AlignError(
            f"{key}={run_dir}: was trained on base model {art.base_model!r}, but this run uses "
            f"model.name_or_path={base_model!r}; use the same model= as that run"
        )
    if art.adapter_dir is not None and not art.adapter_dir.is_dir():
        raise AlignError(f"{key}={run_dir}: its adapter directory {art.adapter_dir} is missing")
    return art
