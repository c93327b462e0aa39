#!/usr/bin/env bash
# A Cloud TPU VM slice (e.g. v5p-32): create it (or reuse it), install the package on every worker,
# and run the same training command on all of them; jax.distributed finds the slice's workers itself
# (AGENTFLOW_DISTRIBUTED=auto).
#
#   launch/tpu_pod.sh --name=grpo --zone=us-east5-a --type=v5p-32 CONFIG[:ARG] [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh --dry-run --name=grpo --zone=us-east5-a --type=v5p-32 CONFIG ...   # print, exit
#
# Options (before the config): --name, --zone, --type (accelerator type), --version (TPU VM runtime,
# default v2-alpha-tpuv5), --repo=URL (cloned on the workers; default: this checkout is copied),
# --dry-run. Needs the gcloud CLI, authenticated, with a project set. Check the memory first:
# python -m agentflow_jax.plan --mesh=fsdp:N --accelerator=v5p.
set -euo pipefail
dry_run=false name="" zone="" type="" version="v2-alpha-tpuv5" repo=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=true ;;
    --name=*) name=${1#--name=} ;;
    --zone=*) zone=${1#--zone=} ;;
    --type=*) type=${1#--type=} ;;
    --version=*) version=${1#--version=} ;;
    --repo=*) repo=${1#--repo=} ;;
    *) echo "error: unknown option $1 (options: --dry-run --name --zone --type --version --repo)" >&2; exit 2 ;;
  esac
  shift
done
config=${1:?usage: $0 [--dry-run] --name=NAME --zone=ZONE --type=TYPE CONFIG[:ARG] [--config.KEY=VALUE ...]}
shift
if [[ -z "$name" || -z "$zone" || -z "$type" ]]; then
  echo "error: give --name, --zone and --type (e.g. --type=v5p-32)" >&2; exit 2
fi
run() { if $dry_run; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu=(gcloud compute tpus tpu-vm)
if $dry_run || ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" --version="$version"
fi
if [[ -n "$repo" ]]; then
  fetch="rm -rf agentflow_jax_src && git clone --depth 1 $repo agentflow_jax_src"
else
  run "${tpu[@]}" scp --recurse --worker=all --zone="$zone" "$(git rev-parse --show-toplevel)" "$name:agentflow_jax_src"
  fetch="true"
fi
setup="$fetch && cd agentflow_jax_src && pip install -q -e '.[tools]' 'jax[tpu]'"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$setup"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all \
  --command="cd agentflow_jax_src && AGENTFLOW_DISTRIBUTED=auto python -m agentflow_jax.train --config=$config $*"
