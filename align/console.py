"""THE one place that quiets library chatter that concerns no align run.

What is silenced here is named precisely (message and emitting module, or one logger), so a
warning about the user's own run still shows. :func:`quiet_libraries` runs when ``align`` is
imported and again when a stage starts (test runners and notebooks reset the warnings filters
in between); it is idempotent.

* bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a 4-bit GEMM kernel from the Hugging
  Face Hub through the optional ``kernels`` package when it is imported, and warns on every run
  that it could not ("Failed to load CPU gemm_4bit_forward from kernels-community"), even with
  adapter=lora. Its built-in CPU path is used either way.
* transformers 5 renamed gradient checkpointing to activation checkpointing and warns when
  the old name is read: TRL 1.16 and peft 0.21 read ``model.is_gradient_checkpointing``
  themselves on every run, and call ``gradient_checkpointing_enable`` (TRL on a PEFT model,
  peft's ``prepare_model_for_kbit_training``). align's own code uses the new names
  (``activation_checkpointing``, ``activation_checkpointing_enable``, forward's ``cache=``).
* TRL marks parts of its API experimental and says so on import or first use
  (``TRL_EXPERIMENTAL_SILENCE`` is its own switch for that; set here when unset).
* ``datasets`` draws one bar per pass over the data, and TRL's trainers make 3-8 passes while
  they are built: :func:`fold_data_bars` folds them into one "preparing data" bar per stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

# (category, message regex (matched at the start), module regex of the code that warns)
WARNING_FILTERS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # TRL's trainers (PEFT models) and peft's prepare_model_for_kbit_training (adapter=qlora)
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated", r"transformers\.modeling_utils"),
    # stacklevel=2: attributed to whichever module imports trl.experimental, so matched by message
    (UserWarning, r"You are importing from 'trl\.experimental'", r""),
]
QUIET_LOGGERS: dict[str, int] = {
    "bitsandbytes.backends.cpu.ops": logging.ERROR,  # the `kernels` message (see above)
}


def quiet_libraries() -> None:
    """Install the filters above (again, if something reset them)."""
    for category, message, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# ---- one progress bar for the data passes -------------------------------------------------
# TRL's trainers run 3-8 `datasets` passes while they are built (tokenise, drop truncated rows,
# the same for the eval split, cache reference log-probs, flatten indices), and align's own cache
# saves the rows once: each pass draws its own bar. Inside fold_data_bars() they all advance one
# bar, "preparing data", whose total grows as passes start (so its ETA covers the passes known
# so far) and whose postfix names the current pass. close_data_bar() ends it (training starts).

_folded: dict[str, Any] = {"bar": None, "desc": "preparing data"}


def _folded_bar(more: int = 0):
    """The open folded bar (opened on first use), its total grown by ``more`` rows."""
    from tqdm.auto import tqdm

    bar = _folded["bar"]
    if bar is None:
        bar = _folded["bar"] = tqdm(total=more, desc=_folded["desc"], unit=" rows", dynamic_ncols=True)
    elif more:
        bar.total = (bar.total or 0) + more
    return bar


def close_data_bar() -> None:
    """End the folded data bar (a later data pass opens a new one)."""
    bar, _folded["bar"] = _folded["bar"], None
    if bar is not None:
        bar.close()


def _folding_class(original: type) -> type:
    """A ``datasets`` progress-bar class that draws nothing itself and advances the folded bar."""
    from datasets.utils.tqdm import are_progress_bars_disabled

    class Folded(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            total, initial = kwargs.get("total"), kwargs.get("initial") or 0
            counts = (
                str(kwargs.get("unit", "")).strip() == "examples"
                and not kwargs.get("disable")
                and not are_progress_bars_disabled()  # HF_DATASETS_DISABLE_PROGRESS_BARS=1
            )
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._align_counts = counts
            if counts:
                bar = _folded_bar(total or 0)
                bar.set_postfix_str(str(kwargs.get("desc") or ""), refresh=False)
                bar.update(initial)

        def update(self, n: float | None = 1) -> bool | None:
            if self._align_counts and n:
                _folded_bar().update(n)
            return super().update(n)

    return Folded


@contextlib.contextmanager
def fold_data_bars(desc: str = "preparing data", *, enabled: bool = True) -> Iterator[None]:
    """Inside, every ``datasets`` pass (map, filter, save_to_disk) advances one bar (see above).
    ``enabled=False`` changes nothing (and does not import ``datasets``)."""
    if not enabled:
        yield
        return
    import datasets.arrow_dataset as arrow_dataset

    original = arrow_dataset.hf_tqdm
    _folded["desc"] = desc
    arrow_dataset.hf_tqdm = _folding_class(original)
    try:
        yield
    finally:
        arrow_dataset.hf_tqdm = original
        close_data_bar()
