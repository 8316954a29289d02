"""align: Hydra-composed LLM alignment (SFT, RM, PPO, DPO) on shared LoRA/QLoRA backbones."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a 4-bit GEMM kernel from the Hugging
# Face Hub through the optional `kernels` package when it is imported, and warns on every run
# that it could not ("Failed to load CPU gemm_4bit_forward from kernels-community"), even with
# adapter=lora. Its built-in CPU path is used either way; the warning concerns no align run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
