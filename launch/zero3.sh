#!/usr/bin/env bash
# DeepSpeed ZeRO-3 on every GPU of this machine; the model loads partitioned.
# usage: launch/zero3.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/chat_sft.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with zero3.yaml "zero3.json" --num_processes "$(gpu_count)" -- "$@"
