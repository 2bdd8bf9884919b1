#!/usr/bin/env bash
# The Ray custom resources of this machine's rayllm role, as JSON for `ray start --resources`
# (cluster/local.yaml; on the clouds each node type declares them instead).
#   trainer  a training-class GPU (A100, H100, H200, B200): policy/critic DeepSpeed groups
#   rollout  any other NVIDIA GPU (L4, L40S, A10G, ...): vLLM engines
#   data     no GPU: Ray Data preparation
# A file $RAYLLM_NODE_RESOURCES_FILE (default ~/.rayllm/node_resources.json) wins, e.g.
# {"trainer": 1} on a machine the rule would call otherwise.
set -euo pipefail

override="${RAYLLM_NODE_RESOURCES_FILE:-$HOME/.rayllm/node_resources.json}"
if [[ -s "$override" ]]; then
  tr -d '\n' < "$override"
  echo
  exit 0
fi

gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
case "$gpu" in
  "") echo '{"data": 1}' ;;
  *A100* | *H100* | *H200* | *B200*) echo '{"trainer": 1}' ;;
  *) echo '{"rollout": 1}' ;;
esac
