"""An installed wheel (not a checkout) finds its configs and shipped data."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_conf_and_reward_data_and_runs_from_anywhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "align/conf/config.yaml" in names and "align/conf/stage/dpo.yaml" in names
    assert "align/conf/model/smollm2-135m.yaml" in names
    assert "align/reward_data/pairs_train.jsonl" in names and "align/reward_data/README.md" in names
    assert "align/classify_data/defects_train.jsonl" in names and "align/conf/stage/classify.yaml" in names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    code = (
        "import sys, runpy; sys.argv = ['align', '--cfg', 'job', 'stage=sft']; "
        f"import align; assert align.__file__.startswith({str(site)!r}), align.__file__; "
        "from align import data; print('DATA', data.reward_data_dir()); "
        "print('CLASSIFY', data.classify_data_dir()); "
        "runpy.run_module('align', run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert "stage: sft" in r.stdout
    assert f"DATA {site}/align/reward_data" in r.stdout
    assert f"CLASSIFY {site}/align/classify_data" in r.stdout
