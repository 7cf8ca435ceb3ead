#!/usr/bin/env bash
# One GPU, plain PyTorch (mixed precision from launch/single_gpu.yaml).
# usage: launch/single_gpu.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/chat_sft.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with single_gpu.yaml ""  -- "$@"
