#!/usr/bin/env bash
# DDP on every GPU of this machine (NUM_GPUS=n to use fewer).
# usage: launch/multi_gpu.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/chat_sft.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with multi_gpu.yaml "" --num_processes "$(gpu_count)" -- "$@"
