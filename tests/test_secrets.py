"""Secrets never land in what align writes: set WANDB_API_KEY / HF_TOKEN and pass a token
as a config value, run a tiny stage (and export it), then grep every file written."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, tiny_overrides

WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B API key
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
TAG_TOKEN = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa987654"  # a token pasted into a config value
PASSWORD = "s3cr3t-Passw0rd-42"
SECRETS = (WANDB_KEY, HF_TOKEN, TAG_TOKEN, PASSWORD)


def _run(args, env):
    return subprocess.run(
        [sys.executable, "-m", "align", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _leaks(root):
    found = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            found += [(str(p.relative_to(root)), s) for s in SECRETS if s.encode() in data]
    return found


def test_no_secret_in_any_file_or_log(tiny_model, tmp_path):
    env = dict(
        os.environ,
        WANDB_API_KEY=WANDB_KEY,
        HF_TOKEN=HF_TOKEN,
        MY_DB_PASSWORD=PASSWORD,
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
    )
    run_dir = tmp_path / "sft"
    args = [
        a for a in tiny_overrides(tiny_model, "data=tiny", "train.max_steps=2") if a != "tracking=disabled"
    ]
    r = _run(
        [
            "stage=sft",
            *args,
            "tracking=offline",
            f"tracking.tags=[smoke,{TAG_TOKEN}]",
            f"tracking.group={PASSWORD}",
            "train.save_steps=1",
            f"hydra.run.dir={run_dir}",
        ],
        env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = _run(
        ["stage=export", f"export.from={run_dir}", "tracking=offline", f"hydra.run.dir={tmp_path}/exp"], env
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert {"sft", "exp"} <= written
    assert (run_dir / "config.yaml").read_text().count("***") >= 2  # masked, not dropped silently
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # the W&B run file was checked too
    assert not _leaks(tmp_path)
    for out in (r.stdout, r.stderr, r2.stdout, r2.stderr):
        assert not [s for s in SECRETS if s in out]
