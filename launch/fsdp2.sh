#!/usr/bin/env bash
# PyTorch FSDP2 on every GPU of this machine (NUM_GPUS=n to use fewer).
# usage: launch/fsdp2.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with fsdp2.yaml "" --num_processes "$(gpu_count)" -- "$@"
