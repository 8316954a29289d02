"""``python -m align stage=<name> [key=value ...]``: the Hydra entry point.

Nothing heavy (torch, transformers, TRL) is imported here: ``--help`` and ``--cfg job``
answer in about a second. The stage module imports what it needs when it runs. Run as a
program, it first settles the C allocator (align.malloc: jemalloc where installed), which
may re-execute the process once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # python -m align, and every rank of `accelerate launch -m align`
    from align import malloc

    malloc.ensure()  # may re-execute this process with jemalloc preloaded: before any heavy import

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from align import overrides, runs  # noqa: E402
from align.config import register  # noqa: E402
from align.errors import AlignError  # noqa: E402


def config_dir() -> str:
    """conf/ inside an installed wheel (align/conf), else the checkout's conf/ at the repo root."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise SystemExit("align: error: cannot find the conf/ directory (a broken installation?)")


def run(cfg: DictConfig) -> float | None:
    from align.backbone import skip_bitsandbytes
    from align.secrets import redact_text, scrub_files
    from align.stages import execute

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sys.argv[:] = [redact_text(a) for a in sys.argv]  # W&B records the command line
    if hc.output_subdir and runs.main_process():
        scrub_files(run_dir / hc.output_subdir)  # Hydra's copy of the overrides
    try:
        if cfg.resume:
            cfg = runs.resume_config(cfg, list(hc.overrides.task))
        # this process is the run's: an unquantized base never needs bitsandbytes (~115 MB at
        # import); not in execute(), where a notebook's later `import bitsandbytes` would fail
        skip_bitsandbytes(cfg)
        metrics = execute(cfg, run_dir)
    except AlignError as e:
        where = runs.mark_failed(run_dir, e)
        print(f"align: error: {e}" + (f"\n  ({where})" if where else ""), file=sys.stderr)
        sys.exit(2)
    except runs.Interrupted as e:
        if runs.main_process():
            print(f"align: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        where = runs.mark_failed(run_dir, e)
        print("align: interrupted" + (f" ({where})" if where else ""), file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("ALIGN_DEBUG"):
            raise
        where = runs.mark_failed(run_dir, e, with_traceback=True)
        first = redact_text(str(e).strip().splitlines()[0] if str(e).strip() else "")[:300]
        print(
            f"align: error: unexpected {type(e).__name__}: {first} ({where or 'no outputs were written'}; "
            "set ALIGN_DEBUG=1 to see the traceback here)",
            file=sys.stderr,
        )
        sys.exit(1)
    # a sweeper (e.g. Optuna) optimises the returned value
    for key in ("eval/rewards/accuracies", "eval/loss", "train/loss"):
        if key in metrics:
            return metrics[key]
    return None


def main() -> None:
    register()
    try:  # one-line errors for misspelt keys and wrong types; one run dir for resume and all ranks
        overrides.check(sys.argv[1:], config_dir())
        sys.argv[1:] = runs.pin_run_dir(sys.argv[1:])
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run)()
    runs.leave_process_group()  # every rank got here: no collective is pending


if __name__ == "__main__":
    main()
