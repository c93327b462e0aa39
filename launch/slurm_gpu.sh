#!/usr/bin/env bash
# Several GPU nodes under SLURM: one training process per node (it drives the node's GPUs), all
# joined by jax.distributed, the coordinator being the first node of the allocation.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh CONFIG[:ARG] [--config.KEY=VALUE ...]
#   launch/slurm_gpu.sh --dry-run CONFIG[:ARG] ...       # print the srun command and exit
#
# Options (before the config): --dry-run; --per-gpu (one process per GPU instead of per node);
# --port=N (coordinator port, default 12355); --venv=DIR (activate this virtual environment first).
# The config's mesh must cover every GPU of the allocation (e.g. {"fsdp": -1}); check the memory
# first with python -m agentflow_jax.plan.
#SBATCH --job-name=agentflow-grpo
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
dry_run=false per_gpu=false port=12355 venv=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=true ;;
    --per-gpu) per_gpu=true ;;
    --port=*) port=${1#--port=} ;;
    --venv=*) venv=${1#--venv=} ;;
    *) echo "error: unknown option $1 (options: --dry-run --per-gpu --port=N --venv=DIR)" >&2; exit 2 ;;
  esac
  shift
done
config=${1:?usage: $0 [--dry-run] [--per-gpu] [--port=N] [--venv=DIR] CONFIG[:ARG] [--config.KEY=VALUE ...]}
shift
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)
tasks=$nodes
tasks_per_node=1
if $per_gpu; then tasks=$((nodes * gpus_per_node)); tasks_per_node=$gpus_per_node; fi
# Each task learns its index from SLURM_PROCID; agentflow_jax.distributed reads these variables.
inner="export AGENTFLOW_COORDINATOR=$head_node:$port AGENTFLOW_NUM_PROCESSES=$tasks"
inner+=" AGENTFLOW_PROCESS_ID=\$SLURM_PROCID;"
if $per_gpu; then inner+=" export CUDA_VISIBLE_DEVICES=\$SLURM_LOCALID;"; fi
if [[ -n "$venv" ]]; then inner+=" source $venv/bin/activate;"; fi
inner+=" exec python -m agentflow_jax.train --config=$config $*"
command=(srun --nodes="$nodes" --ntasks="$tasks" --ntasks-per-node="$tasks_per_node" bash -c "$inner")
if $dry_run; then printf '%q ' "${command[@]}"; echo; exit 0; fi
exec "${command[@]}"
