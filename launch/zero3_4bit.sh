#!/usr/bin/env bash
# DeepSpeed ZeRO-3 with a 4-bit (nf4, bf16-stored) base on every GPU of this machine.
# usage: launch/zero3_4bit.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/text_causal_lm.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with zero3_4bit.yaml "zero3_4bit.json" --num_processes "$(gpu_count)" -- "$@"
