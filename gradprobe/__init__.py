"""gradprobe: measure per-task gradient imbalance in multi-task RL post-training of LLMs."""

__version__ = "0.1.0"

__all__ = ["Measurement", "measure", "measure_tensors"]


def __getattr__(name: str):
    # torch and transformers load on first use, so `import gradprobe` (and the CLI's --help) stay fast.
    if name in __all__:
        from gradprobe import api

        return getattr(api, name)
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
