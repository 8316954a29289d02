"""align: Hydra-composed LLM alignment (SFT, RM, PPO, DPO) on shared LoRA/QLoRA backbones."""

__version__ = "0.1.0"
