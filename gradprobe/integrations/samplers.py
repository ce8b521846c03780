"""TaskWeightedSampler: draw training rows so that tasks come up at given weights.

Each draw picks task t with probability w_t (the weights of `gradprobe report --weights-out`),
then one of t's rows uniformly; draws are with replacement and seeded (a new stream each epoch).

- TRL: return it from a Trainer subclass's `_get_train_sampler(self, dataset=None)`. For
  GRPOTrainer pass the arguments of its own RepeatSampler (`mini_repeat_count=num_generations`,
  `batch_size=generation_batch_size // num_generations`, `repeat_count=num_iterations *
  steps_per_generation`; `TaskWeightedSampler.for_grpo(trainer, dataset, ...)` does it), so
  each drawn prompt comes `num_generations` times in a row and each generation batch is repeated
  as GRPOTrainer's buffering expects (README, "Task weights for the next run").
- verl: `data.sampler.class_path=pkg://gradprobe.integrations.samplers`,
  `data.sampler.class_name=TaskWeightedSampler`, `+data.sampler.weights_file=weights.json` and
  `data.dataloader_num_workers=0` (verl asserts it for any custom sampler). verl's
  create_rl_sampler builds it as `TaskWeightedSampler(data_source=dataset, data_config=config.data)`
  and asserts `isinstance(sampler, AbstractSampler)`; the tasks are the dataset's `data_source`
  column (`+data.sampler.task_key` to change), the seed `data.sampler.seed`, else `data.seed`.
  verl's AbstractSampler is the base class when verl can be imported (so the assert holds in a
  verl job); without verl it is torch's Sampler, which AbstractSampler itself derives from, so
  TRL and plain torch users need no verl.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import torch

try:  # verl checks isinstance(sampler, AbstractSampler); without verl a plain torch Sampler
    from verl.experimental.dataset.sampler import AbstractSampler as _SamplerBase
except Exception:  # noqa: BLE001 - any failure to import verl means "no verl here"
    from torch.utils.data import Sampler as _SamplerBase

WEIGHTS_ENV = "GRADPROBE_TASK_WEIGHTS"
TASK_KEYS = ("task", "data_source")


def _setting(data_config: Any, key: str) -> Any:
    """data_config.sampler.<key> from verl's DictConfig or a plain mapping; None if absent."""
    if data_config is None:
        return None
    sampler = data_config.get("sampler") if hasattr(data_config, "get") else getattr(data_config, "sampler", None)
    if sampler is None:
        return None
    return sampler.get(key) if hasattr(sampler, "get") else getattr(sampler, key, None)


def task_labels(data_source: Any, task_key: str | None = None) -> list[str]:
    """Each row's task: a column of a `datasets.Dataset`, of verl's RLHFDataset (`.dataframe`),
    or the key of each item; by default the first of `task`, `data_source` that exists."""
    table = getattr(data_source, "dataframe", data_source)
    columns = list(getattr(table, "column_names", None) or [])
    if not columns and len(data_source):
        first = data_source[0]
        columns = list(first) if isinstance(first, Mapping) else []
    key = task_key or next((k for k in TASK_KEYS if k in columns), None)
    if key is None or key not in columns:
        raise ValueError(f"no task column {task_key or ' or '.join(TASK_KEYS)} in the dataset (columns: "
                         f"{', '.join(columns)}); pass task_key")
    if hasattr(table, "column_names"):
        return [str(v) for v in table[key]]
    return [str(data_source[i][key]) for i in range(len(data_source))]


class TaskWeightedSampler(_SamplerBase):
    """Indices of `data_source` drawn task by task at `weights` (a mapping, or `weights_file`)."""

    def __init__(self, data_source: Sized, data_config: Any = None, *, weights: Mapping[str, float] | None = None,
                 weights_file: str | None = None, labels: Sequence[str] | None = None, task_key: str | None = None,
                 num_samples: int | None = None, mini_repeat_count: int = 1, batch_size: int = 1,
                 repeat_count: int = 1, seed: int | None = None) -> None:
        from gradprobe.weights import read_weights

        if weights is None:
            weights_file = weights_file or _setting(data_config, "weights_file") or os.environ.get(WEIGHTS_ENV)
            if not weights_file:
                raise ValueError("give weights, weights_file, data.sampler.weights_file or $" + WEIGHTS_ENV)
            weights = read_weights(weights_file)
        labels = list(labels) if labels is not None else task_labels(
            data_source, task_key or _setting(data_config, "task_key"))
        rows: dict[str, list[int]] = {}
        for index, task in enumerate(labels):
            rows.setdefault(task, []).append(index)
        missing = sorted(set(rows) - set(weights))
        absent = sorted(t for t in weights if t not in rows and weights[t] > 0)
        if missing or absent:
            raise ValueError(f"tasks and weights differ: no weight for {missing or 'none'}; "
                             f"no rows for {absent or 'none'}")
        self.tasks = sorted(rows)
        self.rows = [torch.tensor(rows[t]) for t in self.tasks]
        self.probabilities = torch.tensor([float(weights[t]) for t in self.tasks], dtype=torch.float64)
        if not (self.probabilities >= 0).all() or not self.probabilities.sum() > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.probabilities = self.probabilities / self.probabilities.sum()
        if min(mini_repeat_count, batch_size, repeat_count) < 1:
            raise ValueError("mini_repeat_count, batch_size and repeat_count must be at least 1")
        self.num_samples = num_samples or len(labels)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        configured_seed = _setting(data_config, "seed")
        if configured_seed is None and data_config is not None and hasattr(data_config, "get"):
            configured_seed = data_config.get("seed")  # verl's data.seed, which its RandomSampler uses
        self.seed = seed if seed is not None else int(configured_seed) if configured_seed is not None else 0
        self.epoch = 0

    @classmethod
    def for_grpo(cls, trainer: Any, dataset: Sized | None = None, **kwargs: Any) -> "TaskWeightedSampler":
        """The sampler shaped like a TRL GRPOTrainer's own RepeatSampler (its `_get_train_sampler`),
        seeded with the trainer's seed unless `seed` is given; `kwargs` as for the constructor."""
        args = trainer.args
        kwargs.setdefault("seed", args.seed)
        return cls(dataset if dataset is not None else trainer.train_dataset,
                   mini_repeat_count=trainer.num_generations,
                   batch_size=args.generation_batch_size // trainer.num_generations,
                   repeat_count=trainer.num_iterations * args.steps_per_generation, **kwargs)

    def __len__(self) -> int:
        whole = self.num_samples // self.batch_size * self.batch_size  # a partial last batch is dropped, as TRL's
        return whole * self.mini_repeat_count * self.repeat_count

    def draw(self, generator: torch.Generator) -> list[int]:
        """`num_samples` row indices: tasks at the weights, then a row of the task uniformly."""
        tasks = torch.multinomial(self.probabilities, self.num_samples, replacement=True, generator=generator)
        return [int(self.rows[t][torch.randint(len(self.rows[t]), (1,), generator=generator)]) for t in tasks.tolist()]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        indices = self.draw(generator)
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            chunk = indices[start:start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count
