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
"""

from __future__ import annotations

import logging
import os
import warnings

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
