"""Bad input ends with ONE message naming the file, line or key and saying what to do,
before any training starts; a failed run leaves no half-written run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, compose, tiny_overrides, write_jsonl

from align.errors import AlignError
from align.stages import execute

PAIR = {"prompt": "Say hi.", "chosen": "hi there", "rejected": "go away"}
MSG = [{"role": "user", "content": "hi"}]


def _cli(*args, env=None, code=None, timeout=300):
    e = dict(os.environ, WANDB_SILENT="true", HF_HUB_OFFLINE="1", **(env or {}))
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "align", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=e, timeout=timeout)


def _one_line_error(r) -> str:
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert lines and lines[-1].startswith("align: error: "), r.stderr[-2000:]
    assert sum(x.startswith("align: error:") for x in lines) == 1
    return lines[-1]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train.lrr=1"], "unknown key 'train.lrr'; did you mean train.lr?"),
        (["beta=0.3"], "unknown key 'beta'; did you mean dpo.beta"),
        (["stag=dpo"], "unknown key 'stag'; did you mean stage?"),
        (["train.lr=fast"], "train.lr=fast: train.lr takes a number"),
        (["train.max_steps=ten"], "train.max_steps=ten: train.max_steps takes an integer"),
        (["adapter.kind=bogus"], "adapter.kind=bogus: adapter.kind takes one of lora, qlora, dora, none"),
        (["stage=nope"], "stage=nope: no such option; choose one of: "),
        (["adapter=qlra"], "adapter=qlra: no such option; did you mean adapter=qlora?"),
        (["export.fromm=x"], "did you mean export.from?"),
    ],
)
def test_config_mistakes_are_one_line_with_a_suggestion(args, expected, tmp_path):
    r = _cli(*args, f"hydra.run.dir={tmp_path}/run")
    assert expected in _one_line_error(r)
    assert not (tmp_path / "run").exists()  # nothing was started


def _run(tiny_model, tmp_path, rows_or_text, *extra, stage="dpo"):
    p = tmp_path / "data.jsonl"
    if isinstance(rows_or_text, str):
        p.write_text(rows_or_text)
    else:
        write_jsonl(p, rows_or_text)
    cfg = compose(
        f"stage={stage}", *tiny_overrides(tiny_model, f"data.train={p}", "train.max_steps=1", *extra)
    )
    return execute(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "rows,expected",
    [
        (json.dumps(PAIR) + "\n" + '{"prompt": "x", \n', "data.jsonl:2: invalid JSON"),
        (
            [PAIR, {"prompt": "x", "chosen": "a"}],
            "data.jsonl:2: missing column 'rejected' (the row has: chosen, prompt)",
        ),
        ([PAIR, PAIR | {"prompt": "  "}], "data.jsonl:2: 'prompt' is empty"),
        ([PAIR, PAIR, PAIR | {"rejected": ""}], "data.jsonl:3: 'rejected' is empty"),
        ([PAIR, PAIR | {"rejected": "hi there"}], "data.jsonl:2: 'chosen' is identical to 'rejected'"),
        (
            [
                PAIR,
                {
                    "prompt": [{"role": "robot", "content": "x"}],
                    "chosen": MSG,
                    "rejected": MSG[:0] + [MSG[0] | {"content": "yo"}],
                },
            ],
            "data.jsonl:2: prompt[0] has unknown role 'robot'; use one of system, user, assistant, tool",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tiny_model, tmp_path, rows, expected):
    with pytest.raises(AlignError) as e:
        _run(tiny_model, tmp_path, rows)
    assert expected in str(e.value)


def test_missing_data_file_says_which_key_to_set(tiny_model, tmp_path):
    cfg = compose("stage=sft", *tiny_overrides(tiny_model, f"data.train={tmp_path}/nope.jsonl"))
    with pytest.raises(AlignError, match=r"data file not found: .*nope.jsonl \(set data.train="):
        execute(cfg, tmp_path / "run")


LONG = " ".join(["water bees honey river"] * 60)


def test_over_long_prompt_is_an_error_naming_the_line(tiny_model, tmp_path):
    with pytest.raises(AlignError) as e:
        _run(tiny_model, tmp_path, [PAIR, PAIR, PAIR | {"prompt": LONG}], "data.eval_fraction=0")
    msg = str(e.value)
    assert "data.jsonl:3: the prompt is" in msg and "longer than model.max_length=128" in msg
    assert "data.on_error=skip" in msg


def test_on_error_skip_drops_and_counts_bad_and_over_long_rows(tiny_model, tmp_path, capsys):
    rows = [PAIR] * 4 + [PAIR | {"prompt": LONG}, PAIR | {"chosen": "go away"}]
    _run(tiny_model, tmp_path, rows, "data.on_error=skip", "data.eval_fraction=0")
    manifest = json.loads((tmp_path / "run" / "artifact.json").read_text())
    assert manifest["data"]["dropped_rows"] == 2 and manifest["data"]["train_rows"] == 4
    assert "align: data: dropped 2 row(s) (data.on_error=skip); first: " in capsys.readouterr().err


def test_artifact_that_is_not_an_align_run_or_from_another_model(tiny_model, tmp_path):
    cfg = compose("stage=dpo", *tiny_overrides(tiny_model, f"dpo.init={tmp_path}"))
    with pytest.raises(AlignError, match="not a finished align run \\(no artifact.json\\)"):
        execute(cfg, tmp_path / "run")
    other = tmp_path / "other"
    (other / "adapter").mkdir(parents=True)
    (other / "artifact.json").write_text(
        json.dumps(
            {
                "format": "align-artifact/1",
                "stage": "sft",
                "base_model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
                "adapter": {"path": "adapter"},
            }
        )
    )
    cfg = compose("stage=dpo", *tiny_overrides(tiny_model, f"dpo.init={other}"))
    with pytest.raises(
        AlignError, match="was trained on base model 'Qwen/Qwen2.5-0.5B'.*use the same model="
    ):
        execute(cfg, tmp_path / "run2")


def test_qlora_without_a_working_bitsandbytes(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on an unsupported platform
    cfg = compose("stage=sft", "adapter=qlora", *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=1"))
    with pytest.raises(AlignError, match="needs bitsandbytes, which cannot run here.*use adapter=lora"):
        execute(cfg, tmp_path / "run")


def test_failed_cli_run_leaves_no_run_directory(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    r = _cli(
        "stage=dpo",
        *tiny_overrides(tiny_model, f"data.train={tmp_path}/missing.jsonl"),
        "tracking=offline",
        f"hydra.run.dir={run_dir}",
    )
    assert "data file not found" in _one_line_error(r)
    assert not run_dir.exists() and not list(tmp_path.glob("run.failed*"))


def test_non_utf8_data_file_exits_2_before_loading_a_model_and_leaves_nothing(tiny_model, tmp_path):
    data = tmp_path / "export.csv"  # a spreadsheet saved as Windows-1252
    data.write_bytes("prompt,chosen,rejected\nq,a,b\nCaf\u00e9?,a,b\n".encode("cp1252"))
    run_dir = tmp_path / "run"
    r = _cli(
        "stage=dpo",
        *tiny_overrides(tiny_model, f"data.train={data}"),
        "tracking=offline",
        f"hydra.run.dir={run_dir}",
        code=NO_MODEL_LOAD,
    )
    line = _one_line_error(r)
    assert line == f"align: error: {data}:3: not UTF-8 text (byte 0xe9 at column 4); re-save it as UTF-8"
    assert not run_dir.exists() and not list(tmp_path.glob("run.failed*"))


# the CLI, with loading a model made an error: the data must be refused before that
NO_MODEL_LOAD = """
import sys
import align.backbone as backbone
def refuse(*args, **kwargs):
    raise RuntimeError("a model was loaded before the data was checked")
backbone.load_base_model = refuse
sys.argv = ["align", *sys.argv[1:]]
from align.__main__ import main
main()
"""


CRASH = """
import sys
from pathlib import Path
import align.stages.sft as sft
def boom(ctx):
    (Path(ctx.run_dir) / "partial.bin").write_bytes(b"half")
    raise RuntimeError("boom: something nobody anticipated")
sft.run = boom
sys.argv = ["align", *sys.argv[1:]]
from align.__main__ import main
main()
"""


def test_unexpected_exception_is_one_readable_line_and_the_run_is_marked_failed(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    r = _cli("stage=sft", *tiny_overrides(tiny_model), f"hydra.run.dir={run_dir}", code=CRASH)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("align:")]
    assert lines == [lines[0]] and lines[0].startswith(
        "align: error: unexpected RuntimeError: boom: something nobody anticipated (partial outputs moved to"
    )
    assert not run_dir.exists()
    failed = tmp_path / "run.failed"
    assert (failed / "partial.bin").is_file()
    error = (failed / "error.txt").read_text()
    assert "RuntimeError: boom" in error and "Traceback" in error
