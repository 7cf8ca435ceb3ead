#!/usr/bin/env bash
# Two CPU processes over gloo with DeepSpeed ZeRO-2: try the distributed path on a laptop.
# usage: launch/cpu_2proc.sh CONFIG.yaml [--set SECTION.KEY=VALUE ...]   (e.g. examples/chat_sft.yaml)
set -euo pipefail
source "$(dirname "$0")/common.sh"
launch_with cpu_2proc.yaml "zero2.json"  -- "$@"
