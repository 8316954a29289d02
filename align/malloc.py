"""Which C allocator an align process runs on, decided before anything heavy is imported.

On Linux align runs on jemalloc where the library is installed (``install.sh`` installs
Debian's ``libjemalloc2``): glibc's malloc keeps freed activations in fragmented arenas, which
is most of a CPU run's peak memory (docs/benchmarks.md). ``python -m align``, the ``align``
script and every rank under ``accelerate launch -m align`` call :func:`ensure` first; when
jemalloc is wanted, found and not yet loaded, the process re-executes itself once with the
library in ``LD_PRELOAD`` (``os.execve``: the same PID, so exit codes and signals reach the
caller unchanged).

``ALIGN_MALLOC`` chooses:

* ``auto`` (default): jemalloc where found, else the system allocator, silently;
* ``jemalloc``: jemalloc or an error (exit code 2) saying how to install it;
* ``system``: never jemalloc (a jemalloc preloaded through ``LD_PRELOAD`` is taken out).

``ALIGN_JEMALLOC=<path>`` names the library when it lives somewhere unusual. ``MALLOC_CONF``,
when the user sets it, is left alone; otherwise the re-exec sets :data:`DEFAULT_MALLOC_CONF`.

:func:`ensure` also caps the CPU matmul kernel caches (:data:`KERNEL_CACHES`) unless the user
set them: under bf16 autocast, torch's oneDNN path (ideep) caches a kernel and its buffers for
every new matmul shape, up to 1024 of them, and PPO's variable-length batches bring new shapes
every step: a 30-step PPO run's live heap grew 407 -> 841 MB (20 MB a step, still growing).
With both caches at 64 it grew by 12 MB in 10 steps, at the same speed (docs/benchmarks.md).

This module imports only the standard library: it runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import sys
from collections.abc import Iterator
from typing import Any

ENV = "ALIGN_MALLOC"
PATH_ENV = "ALIGN_JEMALLOC"
# Set to the PID of the process that re-executed itself. execve keeps the PID, so the
# re-executed process recognises itself and never executes again, while a child process
# (another PID) that inherits the variable still decides for itself.
GUARD_ENV = "_ALIGN_MALLOC_REEXEC"
MODES = ("auto", "jemalloc", "system")
# jemalloc options the launcher sets when the user has not set MALLOC_CONF (None: jemalloc's
# own defaults). Chosen by measurement, see docs/benchmarks.md.
DEFAULT_MALLOC_CONF: str | None = None

# CPU kernel caches capped before torch is imported (the user's own values are kept): ideep's
# LRU of oneDNN kernels (LRU_CACHE_CAPACITY) and oneDNN's primitive cache; default 1024 each
KERNEL_CACHES: dict[str, str] = {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}

_SEARCH = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/*-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/local/lib64/libjemalloc.so.2",
)


class MallocError(Exception):
    """A user-fixable allocator problem (bad ALIGN_MALLOC, jemalloc required but missing)."""


def mode() -> str:
    raw = os.environ.get(ENV, "").strip().lower() or "auto"
    if raw not in MODES:
        raise MallocError(f"{ENV}={raw!r}: use auto (jemalloc where installed), jemalloc or system")
    return raw


def find_jemalloc() -> str | None:
    """The jemalloc shared library to preload (``ALIGN_JEMALLOC``, else the usual Linux places)."""
    explicit = os.environ.get(PATH_ENV, "").strip()
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    if not sys.platform.startswith("linux"):
        return None
    prefix_lib = os.path.join(sys.prefix, "lib", "libjemalloc.so.2")  # e.g. conda
    for pattern in (prefix_lib, *_SEARCH):
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def loaded() -> str | None:
    """The allocator library mapped into this process other than libc's (jemalloc, tcmalloc,
    mimalloc), from /proc/self/maps; None for the system allocator or where maps is unreadable."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                name = os.path.basename(path)
                if name.startswith(("libjemalloc", "libtcmalloc", "libmimalloc")):
                    return path
    except OSError:
        pass
    return None


# jemalloc's mallctl index meaning "every arena"
_ARENAS_ALL = 4096


@functools.cache
def _mallctl():
    """jemalloc's ``mallctl`` when jemalloc is this process's allocator, else None (looked up
    once: the allocator of a process never changes, and sampling asks on every call)."""
    if not (loaded() or "").rsplit("/", 1)[-1].startswith("libjemalloc"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _decay(mallctl, name: str, value: int | None = None) -> int | None:
    """Read (and with ``value`` set) a ssize_t decay time in ms; None where the arena does not exist."""
    import ctypes

    old, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    new = ctypes.c_ssize_t(value) if value is not None else None
    rc = mallctl(
        name.encode(),
        ctypes.byref(old),
        ctypes.byref(size),
        ctypes.byref(new) if new is not None else None,
        ctypes.sizeof(ctypes.c_ssize_t) if new is not None else 0,
    )
    return old.value if rc == 0 else None


@contextlib.contextmanager
def keep_freed_pages() -> Iterator[None]:
    """Within the block jemalloc keeps the pages it frees (decay off) instead of handing them
    back to the kernel and faulting them in again on the next allocation; on exit the decay
    times are restored and what piled up is purged. A decode or scoring loop frees and
    allocates tens of MB per step (logits, KV-cache buffers): with jemalloc's default decay the
    page faults made ``stage=eval`` on 200 prompts ~30% slower than on glibc malloc (sys time
    25 s vs 3 s for 64 prompts, docs/benchmarks.md). A no-op on other allocators."""
    mallctl = _mallctl()
    saved: list[tuple[str, int]] = []
    if mallctl is not None:
        import ctypes

        n, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
        arenas = (
            n.value if mallctl(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, 0) == 0 else 0
        )
        for i in range(arenas):
            for kind in ("dirty", "muzzy"):
                name = f"arena.{i}.{kind}_decay_ms"
                old = _decay(mallctl, name, -1)
                if old is not None:
                    saved.append((name, old))
    try:
        yield
    finally:
        for name, old in saved:
            _decay(mallctl, name, old)
        if saved:
            mallctl(f"arena.{_ARENAS_ALL}.decay".encode(), None, None, None, 0)


def _preload_entries(value: str) -> list[str]:
    return [e for e in value.replace(":", " ").split() if e]


def _argv() -> list[str]:
    """The command line that started this interpreter, options included (``-m align ...`` or
    the ``align`` script's path)."""
    return list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def plan(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None to go on in this process.
    Raises MallocError when ``ALIGN_MALLOC=jemalloc`` cannot be honoured."""
    env = dict(os.environ if env is None else env)
    want = mode()
    current = loaded()
    if env.get(GUARD_ENV) == str(os.getpid()):  # this process is the re-execution: never again
        if want == "jemalloc" and not (current and "jemalloc" in current):
            raise MallocError(
                f"{ENV}=jemalloc: {env.get('LD_PRELOAD', '')!r} was preloaded but jemalloc is not "
                "loaded (the dynamic loader refused it; see the message above)"
            )
        return None
    preload = _preload_entries(env.get("LD_PRELOAD", ""))
    if want == "system":
        if current and "jemalloc" in current and any("jemalloc" in e for e in preload):
            env["LD_PRELOAD"] = " ".join(e for e in preload if "jemalloc" not in e)
            if not env["LD_PRELOAD"]:
                del env["LD_PRELOAD"]
            env[GUARD_ENV] = str(os.getpid())
            return env
        return None
    if current and ("jemalloc" in current or want == "auto"):
        return None  # jemalloc already, or (auto) another allocator the user preloaded on purpose
    lib = find_jemalloc()
    if lib is None:
        if want == "jemalloc":
            where = os.environ.get(PATH_ENV) or "the usual library directories"
            raise MallocError(
                f"{ENV}=jemalloc but libjemalloc.so.2 was not found in {where}; install it "
                "(Debian/Ubuntu: apt-get install libjemalloc2, or ./install.sh as root), point "
                f"{PATH_ENV} at it, or set {ENV}=auto to run without it"
            )
        return None
    if not sys.platform.startswith("linux"):
        return None
    env["LD_PRELOAD"] = " ".join([lib, *preload])
    if DEFAULT_MALLOC_CONF and "MALLOC_CONF" not in env:
        env["MALLOC_CONF"] = DEFAULT_MALLOC_CONF
    env[GUARD_ENV] = str(os.getpid())
    return env


def ensure() -> None:
    """Re-execute this process once on the allocator ``ALIGN_MALLOC`` asks for (see the module
    docstring). Call it before importing torch: returns only when no re-execution is needed.
    Caps the kernel caches first (:data:`KERNEL_CACHES`)."""
    for name, value in KERNEL_CACHES.items():
        os.environ.setdefault(name, value)
    try:
        env = plan()
    except MallocError as e:
        print(f"align: error: {e}", file=sys.stderr)
        sys.exit(2)
    if env is None:
        return
    argv = _argv()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as e:  # e.g. a sandbox that forbids exec: go on with the allocator we have
        if mode() == "jemalloc":
            print(f"align: error: {ENV}=jemalloc: cannot re-execute with jemalloc: {e}", file=sys.stderr)
            sys.exit(2)


def describe() -> dict[str, Any]:
    """The allocator of this process, as the run summary and artifact.json record it."""
    lib = loaded()
    name = "system"
    if lib:
        name = next(n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in os.path.basename(lib))
    elif sys.platform.startswith("linux"):
        name = "glibc"
    return {
        "name": name,
        "library": lib,
        "mode": os.environ.get(ENV, "").strip().lower() or "auto",
        "malloc_conf": os.environ.get("MALLOC_CONF") if name == "jemalloc" else None,
        "kernel_caches": {k: os.environ.get(k) for k in KERNEL_CACHES},
    }


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (None where getrusage cannot say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def summary_line() -> str:
    """``jemalloc (/usr/lib/.../libjemalloc.so.2), peak RSS 5.06 GB`` for the run summary."""
    d = describe()
    text = d["name"] + (f" ({d['library']})" if d["library"] else "")
    if d["malloc_conf"]:
        text += f" MALLOC_CONF={d['malloc_conf']}"
    peak = peak_rss_bytes()
    if peak:
        text += f", peak RSS {peak / 1e9:.2f} GB"
    if d["name"] == "glibc" and d["mode"] == "auto":
        text += " (jemalloc not found; ./install.sh installs it, see docs/benchmarks.md)"
    return text


def main() -> None:
    """The ``align`` console script: the allocator first, then the Hydra entry point."""
    ensure()
    from align.__main__ import main as align_main

    align_main()


if __name__ == "__main__":
    # ``python -m align.malloc [--exit N | --sleep S]``: settle the allocator as ``python -m
    # align`` does, then print what this process runs on (and its PID) as JSON. The tests use it.
    import json
    import time

    ensure()
    print(json.dumps({"pid": os.getpid(), **describe()}), flush=True)
    args = sys.argv[1:]
    if args[:1] == ["--sleep"]:
        time.sleep(float(args[1]))
    if args[:1] == ["--exit"]:
        sys.exit(int(args[1]))
