"""Our PPO (TRL 1.13+ has none), on the shared LoRA backbone."""
