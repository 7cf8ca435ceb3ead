"""Command line: ``sora-train``, ``sora-merge``, ``sora-export`` (also ``python -m sora_dist.cli <cmd>``).

Each subcommand is one plain function; user mistakes print one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_main(argv: Sequence[str] | None = None) -> int:
    from .config import config_help, load_config

    parser = argparse.ArgumentParser(
        prog="sora-train",
        description="Fine-tune a model with SoRA as one YAML file says. The config is validated before anything heavy starts.",
        epilog="configuration keys (section.key, default, meaning):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML run configuration (see examples/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    from .recipe import run_training

    run_training(config, config.train.output_dir or f"runs/{Path(args.config).stem}")
    return 0


def merge_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora-merge",
        description="Prune zero ranks, fold the gates and merge a SoRA adapter into the base weights, shard by shard.",
    )
    parser.add_argument("--base", required=True, help="full-precision base model folder (safetensors)")
    parser.add_argument("--adapter", required=True, help="adapter folder, training checkpoint or run output folder")
    parser.add_argument("--out", required=True, help="output model folder (must not exist unless --force)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default: as stored in the base)")
    parser.add_argument("--quantize", choices=["nf4", "fp4"], help="requantize the merged weights to 4-bit (bitsandbytes)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-probe", action="store_true", help="skip the output comparison with the 4-bit model an adapter was trained on")
    args = parser.parse_args(argv)

    from .deploy.sources import resolve_adapter
    from .deploy.stream_merge import merge_files

    refuse_output_inside("--out", args.out, {"--adapter": args.adapter, "--base": args.base})
    meta, tensors, where = resolve_adapter(args.adapter)
    result = merge_files(args.base, meta, tensors, args.out, args.dtype, args.quantize, args.force, adapter_name=where)
    print(result.summary())
    if meta.get("base_quantization") and not args.no_probe:
        from .deploy.probe import probe_quantized_training

        print(probe_quantized_training(args.base, meta, tensors, where, args.out).summary())
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-export", description="Export a SoRA adapter to another adapter format.")
    parser.add_argument("--adapter", required=True, help="adapter folder, training checkpoint or run output folder")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--format", choices=["peft"], default="peft", help="peft: a standard PEFT LoRA adapter")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    from .deploy.export import export_peft
    from .deploy.sources import resolve_adapter

    refuse_output_inside("--out", args.out, {"--adapter": args.adapter})
    meta, tensors, where = resolve_adapter(args.adapter)
    config = export_peft(meta, tensors, args.out, args.force, source=where)
    pruned = len(meta["modules"]) - len(config["target_modules"])
    print(
        f"wrote a PEFT LoRA adapter to {args.out} from {where}: {len(config['target_modules'])} modules "
        f"(ranks {min(config['rank_pattern'].values())}-{max(config['rank_pattern'].values())}), {pruned} modules with no live rank left out"
    )
    return 0


def refuse_output_inside(flag: str, out: str, inputs: dict[str, str]) -> None:
    """An output folder that is, holds or lies inside an input would replace (with --force) what is read."""
    target = Path(out).resolve()
    for name, value in inputs.items():
        source = Path(value).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"{flag} {out} overlaps {name} {value}: write the output to a folder of its own")


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {"train": train_main, "merge": merge_main, "export": export_main}


def run(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a user mistake (bad path, mismatch, bad value) prints ``error: ...`` and exits 2."""
    from .data.formats import DataError
    from .options import ConfigError
    from .training.guard import NonFiniteLoss

    try:
        return command(argv)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the command: pass it on after it.
    launcher = [a for a in argv if a.startswith(("--local_rank", "--local-rank"))]
    argv = [a for a in argv if a not in launcher]
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m sora_dist.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return run(COMMANDS[argv[0]], argv[1:] + (launcher if argv[0] == "train" else []))


def train_entry() -> None:
    sys.exit(run(train_main))


def merge_entry() -> None:
    sys.exit(run(merge_main))


def export_entry() -> None:
    sys.exit(run(export_main))


if __name__ == "__main__":
    sys.exit(main())
