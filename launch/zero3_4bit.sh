#!/usr/bin/env bash
# DeepSpeed ZeRO-3 with a 4-bit (nf4, bf16-stored) base on every GPU of this machine.
# usage: launch/zero3_4bit.sh -m sora_dist.train --model MODEL --data DATA.jsonl --output-dir OUT --load-in-4bit --mixed-precision bf16
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with zero3_4bit.yaml "zero3_4bit.json" --num_processes "$(gpu_count)" "$@"
