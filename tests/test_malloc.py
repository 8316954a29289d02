"""The allocator launcher (align.malloc): `python -m align` re-executes itself once with
jemalloc preloaded (ALIGN_MALLOC=auto|jemalloc|system), keeping its PID, exit code and signals.

`python -m align.malloc` settles the allocator exactly as `python -m align` does (the same
`ensure()` call before anything else) and prints what the process runs on, read from
/proc/self/maps. Tests that need the library skip where it is absent (install.sh installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import malloc

REPO = Path(__file__).resolve().parent.parent
JEMALLOC = malloc.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None or not sys.platform.startswith("linux"),
    reason="libjemalloc.so.2 not installed (./install.sh as root, or apt-get install libjemalloc2)",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "MALLOC_CONF", *malloc.KERNEL_CACHES) and "ALIGN_" not in k
    }
    env.update(extra)
    return env


def probe(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run(
        [sys.executable, "-m", "align.malloc", *args],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,  # a re-exec loop would never end: this turns it into a failure
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("{")), None)
    return r, json.loads(line) if line else None


@pytest.mark.parametrize("mode", ["auto", "system"])
def test_kernel_caches_are_capped_unless_the_user_set_them(mode):
    """Every align process starts with torch's CPU kernel caches capped (they grow with every
    new matmul shape under bf16 autocast); a value the user exported is kept."""
    r, info = probe(ALIGN_MALLOC=mode)
    assert r.returncode == 0 and info is not None, r.stderr
    assert info["kernel_caches"] == malloc.KERNEL_CACHES
    r, info = probe(ALIGN_MALLOC=mode, LRU_CACHE_CAPACITY="512")
    assert info["kernel_caches"]["LRU_CACHE_CAPACITY"] == "512"
    assert info["kernel_caches"]["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


@needs_jemalloc
@pytest.mark.parametrize("mode", ["jemalloc", "auto", ""])
def test_jemalloc_is_mapped_into_the_reexecuted_process(mode):
    r, info = probe(ALIGN_MALLOC=mode)
    assert r.returncode == 0, r.stderr
    assert info["name"] == "jemalloc" and "libjemalloc" in info["library"]
    assert Path(info["library"]).resolve() == Path(JEMALLOC).resolve()


def test_system_never_maps_jemalloc():
    r, info = probe(ALIGN_MALLOC="system")
    assert r.returncode == 0, r.stderr
    assert info["library"] is None and info["name"] in ("glibc", "system")


@needs_jemalloc
def test_system_takes_out_a_preloaded_jemalloc():
    """A process started under jemalloc (e.g. a child of an align run, which inherits LD_PRELOAD)
    still gets the system allocator when it asks for it."""
    r, info = probe(ALIGN_MALLOC="system", LD_PRELOAD=JEMALLOC, _ALIGN_MALLOC_REEXEC="1")
    assert r.returncode == 0, r.stderr
    assert info["library"] is None


@needs_jemalloc
def test_one_reexec_keeps_the_pid_and_a_child_inherits_without_a_second_exec():
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.malloc"],
        cwd=REPO,
        env=clean_env(ALIGN_MALLOC="jemalloc"),
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    info = json.loads(out)
    assert info["pid"] == proc.pid  # execve: the caller's child is the process that ran
    # a child of it inherits LD_PRELOAD: jemalloc is already loaded, nothing to do
    env = clean_env(ALIGN_MALLOC="jemalloc", LD_PRELOAD=JEMALLOC, _ALIGN_MALLOC_REEXEC="1")
    code = "import os; from align import malloc; print(malloc.plan() is None, malloc.loaded())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.stdout.split()[0] == "True" and "jemalloc" in r.stdout, r.stderr


def test_a_library_that_does_not_load_causes_no_loop(tmp_path):
    """The loader refuses the 'library' (not an ELF file): the re-executed process recognises
    itself by the guard variable and goes on (auto) or stops with a clear error (jemalloc)."""
    fake = tmp_path / "libjemalloc.so.2"
    fake.write_text("not a shared library\n")
    r, info = probe(ALIGN_MALLOC="auto", ALIGN_JEMALLOC=str(fake))
    assert r.returncode == 0 and info["library"] is None, r.stderr
    r, info = probe(ALIGN_MALLOC="jemalloc", ALIGN_JEMALLOC=str(fake))
    assert r.returncode == 2 and info is None
    assert "align: error: ALIGN_MALLOC=jemalloc" in r.stderr and "jemalloc is not loaded" in r.stderr


def test_missing_library_is_silent_under_auto_and_an_error_under_jemalloc(tmp_path):
    missing = str(tmp_path / "nowhere" / "libjemalloc.so.2")
    r, info = probe(ALIGN_MALLOC="auto", ALIGN_JEMALLOC=missing)
    assert r.returncode == 0 and r.stderr == "" and info["library"] is None
    r, info = probe(ALIGN_MALLOC="jemalloc", ALIGN_JEMALLOC=missing)
    assert r.returncode == 2 and info is None
    assert "ALIGN_MALLOC=jemalloc but libjemalloc.so.2 was not found" in r.stderr
    assert "apt-get install libjemalloc2" in r.stderr and "Traceback" not in r.stderr
    r, _ = probe(ALIGN_MALLOC="tcmalloc")
    assert r.returncode == 2 and "use auto" in r.stderr


def test_python_m_align_settles_the_allocator_before_hydra(tmp_path):
    """The real entry point calls the launcher: a required but missing jemalloc stops it with
    exit code 2 before any config is composed; --cfg job works with it present or absent."""
    missing = str(tmp_path / "libjemalloc.so.2")
    r = subprocess.run(
        [sys.executable, "-m", "align", "--cfg", "job"],
        cwd=REPO,
        env=clean_env(ALIGN_MALLOC="jemalloc", ALIGN_JEMALLOC=missing),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "ALIGN_MALLOC=jemalloc but libjemalloc.so.2 was not found" in r.stderr
    assert "stage:" not in r.stdout
    for mode in ("auto", "system"):
        r = subprocess.run(
            [sys.executable, "-m", "align", "--cfg", "job"],
            cwd=REPO,
            env=clean_env(ALIGN_MALLOC=mode),
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and "stage:" in r.stdout, r.stderr


@pytest.mark.parametrize("mode", ["auto", "system"])
def test_exit_codes_and_signals_pass_through(mode):
    r, info = probe("--exit", "7", ALIGN_MALLOC=mode)
    assert r.returncode == 7 and info is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.malloc", "--sleep", "60"],
        cwd=REPO,
        env=clean_env(ALIGN_MALLOC=mode),
        stdout=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # printed after the re-exec: the signal reaches the final process
    assert json.loads(first)["pid"] == proc.pid
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM and time.time() - t < 10
    proc.stdout.close()


@needs_jemalloc
def test_run_summary_and_artifact_record_the_allocator(tiny_model, tmp_path):
    """A real `python -m align` run (tiny model, 2 steps): artifact.json's hardware section
    names jemalloc and the library, and the summary prints it with the peak RSS."""
    from conftest import tiny_overrides

    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "align",
            "stage=sft",
            *tiny_overrides(tiny_model, "data=tiny", "train.max_steps=2", "data.max_eval_rows=4"),
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    alloc = json.loads((out / "artifact.json").read_text())["hardware"]["allocator"]
    assert alloc["name"] == "jemalloc" and alloc["mode"] == "auto" and "libjemalloc" in alloc["library"]
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("malloc"))
    assert "jemalloc (" in line and "peak RSS" in line


@needs_jemalloc
def test_the_align_console_script_settles_the_allocator_too(tmp_path):
    """pyproject's `align` script is align.malloc:main; a script as pip generates it for that
    entry point runs on jemalloc and still answers --cfg job."""
    import tomllib

    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["align"]
    assert spec == "align.malloc:main"
    script = tmp_path / "align"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from align.malloc import describe, main\n"
        "if __name__ == '__main__':\n"
        "    print('ALLOCATOR', describe()['name'], file=sys.stderr)\n"
        "    sys.exit(main())\n"
    )
    script.chmod(0o755)
    r = subprocess.run([str(script), "--cfg", "job"], env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "stage:" in r.stdout, r.stderr
    # the first process (before the re-exec) prints glibc, the re-executed one jemalloc
    assert "ALLOCATOR glibc" in r.stderr and "ALLOCATOR jemalloc" in r.stderr


KEEP_PAGES_PROBE = """
import json
from align import malloc
m = malloc._mallctl()
arenas = lambda: [malloc._decay(m, f"arena.{i}.{k}_decay_ms") for i in (0,) for k in ("dirty", "muzzy")]
before = arenas()
with malloc.keep_freed_pages():
    inside = arenas()
print(json.dumps({"before": before, "inside": inside, "after": arenas()}))
"""


@needs_jemalloc
def test_keep_freed_pages_turns_jemalloc_decay_off_inside_and_restores_it():
    """The sampling loops run inside malloc.keep_freed_pages: jemalloc's decay off (no purge and
    re-fault of the pages a decode step frees), the user's decay times back afterwards."""
    r = subprocess.run(
        [sys.executable, "-c", KEEP_PAGES_PROBE],
        cwd=REPO,
        env=clean_env(LD_PRELOAD=JEMALLOC, MALLOC_CONF="dirty_decay_ms:1234,muzzy_decay_ms:56"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"before": [1234, 56], "inside": [-1, -1], "after": [1234, 56]}
