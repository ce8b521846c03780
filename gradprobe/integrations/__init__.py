"""gradprobe inside other tools: training-loop callbacks that measure while a model trains.

Each integration is its own module, imported only when used, so its framework stays optional
(`gradprobe.integrations.trl` needs the `trl` extra).
"""
