"""gradprobe inside other tools: pieces trainers import.

Each integration is its own module, imported only when used, so its framework stays optional:
`gradprobe.integrations.trl` (a GRPOTrainer/RLOOTrainer callback that measures while a model
trains; the `trl` extra) and `gradprobe.integrations.samplers` (task weights as a sampler that
TRL and verl take).
"""
