"""align: Hydra-composed LLM alignment (SFT, RM, PPO, DPO) on shared LoRA/QLoRA backbones."""

__version__ = "0.1.0"

from align.console import quiet_libraries as _quiet_libraries

_quiet_libraries()  # library warnings that concern no align run (align/console.py)
