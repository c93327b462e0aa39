#!/usr/bin/env bash
# One host (CPU, one GPU, or all GPUs / TPU chips of one machine): one process; JAX sees every local
# device and the config's mesh spreads over them.
#
#   launch/single_host.sh [--dry-run] CONFIG[:ARG] [--config.KEY=VALUE ...]
#   launch/single_host.sh experiments/configs/qwen2_5_small_flow_grpo.py:1.5b --config.model.path=/models/...
#
# A config with a `toy` section (experiments/configs/tiny_cpu.py) runs the toy pipeline instead.
set -euo pipefail
dry_run=false
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=true; shift; fi
config=${1:?usage: $0 [--dry-run] CONFIG[:ARG] [--config.KEY=VALUE ...]}
shift
module=agentflow_jax.train
if grep -q "config.toy" "${config%%:*}" 2>/dev/null; then module=agentflow_jax.toy; fi
command=(python -m "$module" --config="$config" "$@")
if $dry_run; then echo "${command[*]}"; exit 0; fi
exec "${command[@]}"
