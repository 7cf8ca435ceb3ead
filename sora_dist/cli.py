"""Command line: ``sora-train``, ``sora-merge``, ``sora-export`` (also ``python -m sora_dist.cli <cmd>``).

Each subcommand is one plain function; user mistakes print one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
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
    parser.add_argument("--preview", nargs="?", const=3, type=preview_count, metavar="N",
                        help="print N training examples (default 3) with their trained tokens marked and the data's figures, "
                             "then exit without loading the model")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set, default_output_dir=f"runs/{Path(args.config).stem}")
    if args.preview is not None:
        from .recipe import preview_data

        preview_data(config, args.preview)
        return 0
    from .recipe import run_training

    run_training(config, config.train.output_dir)
    return 0


def preview_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a number of examples (0 or more), got {value!r}")
    return count


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
    require_folders({"--adapter": args.adapter, "--base": args.base})
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
    require_folders({"--adapter": args.adapter})
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
    from .deploy.atomic import file_in_the_way

    target = Path(out).resolve()
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ValueError(f"{flag} {out}: cannot create it: {blocker} is a file, not a folder")
    for name, value in inputs.items():
        source = Path(value).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"{flag} {out} overlaps {name} {value}: write the output to a folder of its own")


def require_folders(inputs: dict[str, str]) -> None:
    for flag, value in inputs.items():
        if not Path(value).is_dir():
            raise FileNotFoundError(f"{flag} {value}: {'is a file, not' if Path(value).exists() else 'no such'} folder")


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {"train": train_main, "merge": merge_main, "export": export_main}


PEER_GRACE = 2.0  # seconds a rank > 0 waits before reporting its own error (see report)


def process_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def report(message: str, everywhere: bool = True) -> None:
    """Print ``error: message`` once per run, not once per process.

    Rank 0 prints at once. With several processes, an error every rank meets alike (a config
    error) and a rank's reaction to another rank's failure (lost connection, SIGTERM from the
    launcher) are printed by rank 0 only (``everywhere`` False). A rank > 0 reports its own
    error after PEER_GRACE seconds, prefixed with its rank: if rank 0 failed as well, the launcher
    stops this process first and only rank 0's line is seen.
    """
    rank, world = process_rank()
    if rank > 0 and not everywhere:
        return
    if rank > 0:
        time.sleep(PEER_GRACE)
        message = f"rank {rank}: {message}"
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)


def peer_failure(err: BaseException) -> bool:
    """A collective failed because another process of the run died (gloo/NCCL lost its peer)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def stop_on_sigterm() -> None:
    """Under a launcher, SIGTERM means "another process failed": leave with one line, no traceback."""
    if process_rank()[1] <= 1:
        return

    def stop(signum, frame):
        report("stopped by the launcher (SIGTERM): another process of this run failed or was killed; its message "
               "and the launcher's summary say which", everywhere=False)  # fmt: skip
        os._exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)


def run(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a user mistake (bad path, mismatch, bad value) prints ``error: ...`` and exits 2."""
    from .data.formats import DataError
    from .options import ConfigError
    from .training.guard import NonFiniteLoss

    stop_on_sigterm()
    try:
        return command(argv)
    except ConfigError as err:
        report(str(err), everywhere=False)
        return 2
    except (DataError, OSError, ValueError, NonFiniteLoss) as err:
        report(str(err))
        return 2
    except RuntimeError as err:
        if not peer_failure(err) or process_rank()[1] <= 1:
            raise
        report("lost contact with another process of this run: it failed or was killed (the launcher's summary names it)",
               everywhere=False)  # fmt: skip
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
