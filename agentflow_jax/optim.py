"""The optimizer of every training loop here (Flow-GRPO and supervised warm starts): AdamW with
global-norm clipping and a learning-rate schedule, configured by one `OptimConfig` section."""

from __future__ import annotations

import dataclasses

import optax

from agentflow_jax.config_reader import check_fields, setting

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings (defaults: the paper's Flow-GRPO run, SPEC section 3).

    Attributes:
      learning_rate: peak rate (the paper: 1e-6 for 7B).
      b1, b2, weight_decay: AdamW.
      grad_clip: global-norm clipping threshold.
      warmup_steps: linear warm-up from 0 to the peak rate.
      schedule: "constant" after the warm-up, or "cosine" decay to `end_lr_fraction` of the peak
        at the run's last step.
      end_lr_fraction: the cosine schedule's final rate as a fraction of the peak.
    """

    learning_rate: float = setting(1e-6, min=0.0)
    b1: float = setting(0.9, min=0.0, max=1.0)
    b2: float = setting(0.999, min=0.0, max=1.0)
    weight_decay: float = setting(0.01, min=0.0)
    grad_clip: float = setting(1.0, above=0.0)
    warmup_steps: int = setting(0, min=0)
    schedule: str = setting("constant", choices=SCHEDULES)
    end_lr_fraction: float = setting(0.0, min=0.0, max=1.0)

    def __post_init__(self):
        check_fields(self)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """The rate at each optimizer step: warm-up, then constant or cosine decay until `total_steps`."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, min(warmup, total_steps)),
                                                  max(total_steps, warmup + 1), end_value=peak * config.end_lr_fraction)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def make_optimizer(config: OptimConfig, total_steps: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with `learning_rate_schedule(config, total_steps)`."""
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                                   weight_decay=config.weight_decay))
