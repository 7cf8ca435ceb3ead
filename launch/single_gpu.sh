#!/usr/bin/env bash
# One GPU, plain PyTorch (mixed precision from launch/single_gpu.yaml).
# usage: launch/single_gpu.sh -m sora_dist.train --model MODEL --data DATA.jsonl --output-dir OUT 
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with single_gpu.yaml ""  "$@"
