"""`TrainState`: everything a training run must carry from one step to the next, and all that a
checkpoint saves and restores (`checkpoint.TrainCheckpointer`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

_SEED_MODULUS = 2**32


@dataclasses.dataclass(frozen=True)
class TrainState:
    """One run's state after `step` optimizer steps.

    Attributes:
      params: the trained parameters (an `nnx.State`, possibly sharded).
      opt_state: the optax state of `params`.
      step: optimizer steps taken so far.
      rng: [] uint32, the run's base seed; step s draws its randomness from `step_seed(s)` alone,
        so a resumed run samples exactly what an uninterrupted one would.
      data_iterator: the training data's grain iterator; its position is the data state (saved
        per process), or None for loops fed otherwise.
    """

    params: Any
    opt_state: Any
    step: int = 0
    rng: np.ndarray = dataclasses.field(default_factory=lambda: np.asarray(0, np.uint32))
    data_iterator: grain.DatasetIterator | None = None

    @classmethod
    def create(cls, params: Any, optimizer: Any, *, seed: int, data_iterator: grain.DatasetIterator | None = None,
               opt_state: Any = None) -> "TrainState":
        """Step 0: `optimizer.init(params)` (or `opt_state`, one already initialised, e.g. placed on a
        mesh) and the base seed."""
        return cls(params=params, opt_state=optimizer.init(params) if opt_state is None else opt_state, step=0,
                   rng=np.asarray(seed % _SEED_MODULUS, np.uint32), data_iterator=data_iterator)

    def step_seed(self, step: int | None = None) -> int:
        """The sampling seed of `step` (default: the next step), a function of (rng, step) only."""
        step = self.step if step is None else step
        return (int(self.rng) * 7919 + step) % _SEED_MODULUS

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)
