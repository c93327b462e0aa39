"""The toy world end to end: world -> tokenizer -> warm start -> Flow-GRPO -> held-out evaluation.

    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py
    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py --warm_start_only
    python -m agentflow_jax.toy --config=experiments/configs/tiny_cpu.py \\
        --config.optim.learning_rate=0.0 --config.workdir=runs/tiny_cpu_lr0      # the untrained control

The warm start (world, demonstrations, tokenizer, supervised planner, report) is written under
`<workdir>/warm_start` and reused when it was built with the same configuration; then the
ordinary training run (`agentflow_jax.train.run`) trains the planner with Flow-GRPO from it.
"""

from __future__ import annotations

from absl import app, flags

from agentflow_jax import cli, train
from agentflow_jax.experiment import read_experiment
from agentflow_jax.toy.config import read_toy
from agentflow_jax.toy.warm_start import ensure_warm_start

_CONFIG = cli.config_flag()
_WARM_START_ONLY = flags.DEFINE_bool("warm_start_only", False, "Build the warm start and stop before Flow-GRPO.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.KEY=VALUE")
    config, source = cli.load_config(_CONFIG)
    experiment = read_experiment(config, source=source, extra_sections=("toy",))
    ensure_warm_start(read_toy(config, experiment))
    if not _WARM_START_ONLY.value:
        train.run(experiment)


if __name__ == "__main__":
    cli.run(main)
