#!/usr/bin/env bash
# PyTorch FSDP2 with a 4-bit (nf4, bf16-stored) base on every GPU of this machine (NUM_GPUS=n to use fewer).
# usage: launch/fsdp2_4bit.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with fsdp2_4bit.yaml "" --num_processes "$(gpu_count)" -- "$@"
