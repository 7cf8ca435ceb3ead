#!/usr/bin/env bash
# DeepSpeed ZeRO-2 on every GPU of this machine (NUM_GPUS=n to use fewer).
# usage: launch/zero2.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/chat_sft.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with zero2.yaml "zero2.json" --num_processes "$(gpu_count)" -- "$@"
