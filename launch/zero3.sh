#!/usr/bin/env bash
# DeepSpeed ZeRO-3 on every GPU of this machine; the model loads partitioned.
# usage: launch/zero3.sh -m sora_dist.train --model MODEL --data DATA.jsonl --output-dir OUT --mixed-precision bf16
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with zero3.yaml "zero3.json" --num_processes "$(gpu_count)" "$@"
