"""``python -m align stage=<name> [key=value ...]``: the Hydra entry point.

Nothing heavy (torch, transformers, TRL) is imported here: ``--help`` and ``--cfg job``
answer in about a second. The stage module imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from align.config import register
from align.errors import AlignError


def config_dir() -> str:
    """conf/ inside an installed wheel (align/conf), else the checkout's conf/ at the repo root."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise SystemExit("align: error: cannot find the conf/ directory (a broken installation?)")


def run(cfg: DictConfig) -> float | None:
    from align.stages import execute

    try:
        metrics = execute(cfg, HydraConfig.get().runtime.output_dir)
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr)
        sys.exit(2)
    # a sweeper (e.g. Optuna) optimises the returned value
    for key in ("eval/rewards/accuracies", "eval/loss", "train/loss"):
        if key in metrics:
            return metrics[key]
    return None


def main() -> None:
    register()
    hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run)()


if __name__ == "__main__":
    main()
