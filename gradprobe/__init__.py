"""gradprobe: measure per-task gradient imbalance in multi-task RL post-training of LLMs."""

__version__ = "0.1.0"
