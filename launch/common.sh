# Shared by the launch/*.sh wrappers: where things are and how many GPUs to use.
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"

# NUM_GPUS overrides; otherwise every GPU nvidia-smi lists (CUDA_VISIBLE_DEVICES is honoured by torch).
gpu_count() {
    if [[ -n "${NUM_GPUS:-}" ]]; then
        echo "$NUM_GPUS"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    else
        nvidia-smi -L | wc -l
    fi
}

# launch_with <yaml name> <deepspeed json name or ""> [accelerate options] -- CONFIG.yaml [--set KEY=VALUE ...]
# runs sora-train (python -m sora_dist.cli train) on CONFIG.yaml under accelerate launch.
launch_with() {
    local yaml="$1" json="$2"
    shift 2
    local extra=()
    [[ -n "$json" ]] && extra+=(--deepspeed_config_file "$REPO_DIR/ds_configs/$json")
    while [[ $# -gt 0 && "$1" != "--" ]]; do extra+=("$1"); shift; done
    [[ "${1:-}" == "--" ]] && shift
    exec accelerate launch --config_file "$LAUNCH_DIR/$yaml" "${extra[@]}" -m sora_dist.cli train "$@"
}
