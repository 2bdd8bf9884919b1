"""rayllm: SFT -> reward model -> PPO on Ray with DeepSpeed model groups."""
