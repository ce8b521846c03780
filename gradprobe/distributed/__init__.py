"""The scan on several processes (torchrun): process group, prompt shares, combined reductions.

`session` joins torchrun's process group (or adopts a trainer's) and shares failures between
ranks; `data_parallel` assigns whole prompts to ranks and completes the engine's reductions
across them; `rollouts` splits sampling so that every rank's rollouts are those one process
would sample.
"""

from gradprobe.distributed.session import DistributedFailure, Session, current, joined_session, open_session

__all__ = ["DistributedFailure", "Session", "current", "joined_session", "open_session"]
