#!/usr/bin/env bash
# One host (CPU, one GPU, or all GPUs / TPU chips of one machine): JAX sees every local device and
# the config's mesh spreads over them.
#   launch/single_host.sh experiments/configs/tiny_cpu.py [--config.KEY=VALUE ...]
set -euo pipefail
config=${1:?usage: $0 CONFIG_FILE [--config.KEY=VALUE ...]}
shift
exec python -m agentflow_jax.train --config="$config" "$@"
