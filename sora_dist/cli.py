"""Command line: ``sora <command>`` (train, merge, export, chat, generate, eval), ``sora-train``,
``sora-merge``, ``sora-export`` (also ``python -m sora_dist.cli <command>``).

Each subcommand is one plain function; user mistakes print one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
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
    return whole_number(value, "a number of examples (0 or more)")


def merge_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora-merge",
        description="Prune zero ranks, fold the gates and merge a SoRA adapter into the base weights, shard by shard.",
    )
    parser.add_argument("--base", help="full-precision base model folder (safetensors); default: the run's model.path when --adapter is in a run folder")
    parser.add_argument("--adapter", required=True, help="adapter folder, training checkpoint or run output folder")
    parser.add_argument("--out", required=True, help="output model folder (must not exist unless --force)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default: as stored in the base)")
    parser.add_argument("--quantize", choices=["nf4", "fp4"], help="requantize the merged weights to 4-bit (bitsandbytes)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-probe", action="store_true", help="skip the output comparison with the 4-bit model an adapter was trained on")
    args = parser.parse_args(argv)

    from .deploy.sources import resolve_adapter
    from .deploy.stream_merge import merge_files

    if args.base is None:
        args.base = base_of_run(args.adapter)
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


def base_of_run(adapter: str) -> str:
    """The base model of the run folder ``adapter`` lies in (its config.yaml's model.path)."""
    from .inference import find_run_config, read_run_config
    from .models import resolve_model_path

    config = find_run_config(Path(adapter))
    path = (read_run_config(config).get("model") or {}).get("path") if config is not None else None
    if not path:
        raise ValueError(f"--base is required: --adapter {adapter} is not in a run folder whose config.yaml names model.path")
    return resolve_model_path(path)


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


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL or --base/--adapter, and how to load it (sora chat, generate, eval)."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="run folder written by sora-train (its config.yaml names the base model, dtype and quantization; "
                             "the adapter is its adapter/ or newest checkpoint) or a merged model folder")  # fmt: skip
    parser.add_argument("--base", help="base model folder or hub id (instead of MODEL, with --adapter)")
    parser.add_argument("--adapter", help="adapter folder, training checkpoint or run folder to apply to --base")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the base weights first (default: unmerged, pruned to its live ranks)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the base weights (default: the run's, or as stored)")


def sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help=f"tokens to generate at most (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this probability (with --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def check_sampling(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must be in (0, 1], got {args.top_p}")
    import torch

    torch.manual_seed(args.seed)


def load_from(args: argparse.Namespace, verbose: bool = True):
    from .inference import load_for_inference

    loaded = load_for_inference(args.model, args.base, args.adapter, args.merge, args.dtype, verbose=verbose)
    if loaded.task != "causal_lm" and args.command != "eval":
        raise ValueError(f"{loaded.description} is a {loaded.task} model: it cannot generate text (sora eval scores it)")
    return loaded


def chat_main(argv: Sequence[str] | None = None, stdin=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora chat",
        description="Talk to a trained model with its chat template, replies streamed as they are generated. "
                    "Typed in a terminal: /reset starts over, /exit leaves. Piped: one message per line in, one reply "
                    "per line out (newlines in a reply become spaces), the conversation kept across lines.",
    )  # fmt: skip
    model_arguments(parser)
    parser.add_argument("--system", help="system message that opens the conversation")
    sampling_arguments(parser, 512)
    args = parser.parse_args(argv)
    args.command = "chat"
    check_sampling(args)
    from .inference import chat_session

    stdin = sys.stdin if stdin is None else stdin
    loaded = load_from(args)
    chat_session(loaded, stdin, sys.stdout, args.system, args.temperature, args.top_p, args.max_new_tokens)
    return 0


def generate_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora generate",
        description="Complete every row of a data file (chat: the conversation up to its last assistant message; "
                    "instruction: the prompt as training builds it; text: the text) and write each row with a "
                    "'completion' field as JSON lines, in input order. Under torchrun / accelerate launch the rows are "
                    "split across the processes and rank 0 writes the same file one process would.",
    )  # fmt: skip
    model_arguments(parser)
    parser.add_argument("--data", required=True, help="data file in a training format (.jsonl, .json, .csv, .parquet, folder, asset:NAME)")
    parser.add_argument("--out", required=True, help="output .jsonl file (replaced if it exists)")
    parser.add_argument("--format", choices=["chat", "instruction", "text"], help="data format (default: from the first row's fields)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows generated together, left-padded (default 8)")
    sampling_arguments(parser, 256)
    args = parser.parse_args(argv)
    args.command = "generate"
    check_sampling(args)
    if Path(args.out).resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {args.out} is the --data file: write the output to another file")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder, not a file")
    from .data.pipeline import data_path
    from .inference import generate_file, world

    data_path(args.data, "--data")
    if not args.data.startswith("asset:") and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    rank, _ = world()
    loaded = load_from(args, verbose=rank == 0)
    written = generate_file(loaded, args.data, args.out, args.format, args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
    if rank == 0:
        print(f"wrote {written} rows with their completions to {args.out}", file=sys.stderr, flush=True)
    finish_processes()
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora eval",
        description="Score a trained model on a data file as the training loop's evaluation does: the data tokenized as "
                    "for training, held-out loss and perplexity, and for chat and instruction data how often a greedy "
                    "reply starts with the reference answer (a classifier: its classification metrics). With --lm-eval, "
                    "run lm-evaluation-harness tasks on the same loaded model instead.",
    )  # fmt: skip
    model_arguments(parser)
    parser.add_argument("--data", help="data file in a training format (any source data.train_file accepts); this or --lm-eval")
    parser.add_argument("--format", choices=["chat", "instruction", "text", "blocks", "classification"],
                        help="data format (default: the run's when the data has its fields, else from the fields)")  # fmt: skip
    parser.add_argument("--max-length", type=positive_int, help="truncate examples to this many tokens (default: the run's data.max_length, else 512)")
    parser.add_argument("--batch-size", type=positive_int, help="evaluation batch size (default: the run's data.eval_batch_size, else 16)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="tokens generated per answer for the accuracy; 0 skips it (default: the run's data.eval_generate_tokens, else 32)")  # fmt: skip
    harness_options = parser.add_argument_group("lm-evaluation-harness (the optional extra lmeval: pip install 'sora_dist[lmeval]')")
    harness_options.add_argument("--lm-eval", metavar="TASK[,TASK...]",
                                 help="run these lm-evaluation-harness tasks (names, groups or tags) on the loaded model instead of --data")  # fmt: skip
    harness_options.add_argument("--lm-eval-include", metavar="DIR", help="folder of YAML task configs of your own, looked up with the harness's tasks")
    harness_options.add_argument("--num-fewshot", type=non_negative_int, metavar="N", help="few-shot examples per prompt (default: each task's own, else 0)")
    harness_options.add_argument("--limit", type=positive_int, metavar="N", help="evaluate only the first N documents of each task")
    harness_options.add_argument("--apply-chat-template", action="store_true",
                                 help="render each prompt as a user turn with the tokenizer's chat template (for chat-trained models)")  # fmt: skip
    harness_options.add_argument("--system-instruction", metavar="TEXT", help="system message put before each prompt (with --apply-chat-template)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.command = "eval"
    if (args.data is None) == (args.lm_eval is None):
        raise ValueError("give --data FILE (loss, perplexity, accuracy on a data file) or --lm-eval TASK[,TASK...] "
                         "(lm-evaluation-harness tasks)" + (", not both" if args.data is not None else ""))  # fmt: skip
    if args.lm_eval is not None:
        return lm_eval_main(args)
    misplaced = [flag for flag, value in (("--lm-eval-include", args.lm_eval_include), ("--num-fewshot", args.num_fewshot),
                                          ("--limit", args.limit), ("--apply-chat-template", args.apply_chat_template or None),
                                          ("--system-instruction", args.system_instruction)) if value is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only with --lm-eval")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if not args.data.startswith("asset:") and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    from .backends import accelerate as engine
    from .inference import evaluate_file, metrics_table, resolve_sources

    _, _, run_config = resolve_sources(args.model, args.base, args.adapter)
    mixed = ((run_config or {}).get("distributed") or {}).get("mixed_precision")
    accelerator = engine.build_accelerator(None, mixed)
    finished = False
    try:
        loaded = load_from(args, verbose=accelerator.is_main_process)
        quantized = getattr(loaded.model.config, "quantization_config", None) is not None
        loaded.model = accelerator.prepare_model(loaded.model, device_placement=not quantized, evaluation_mode=True)
        loaded.device = accelerator.device
        result = evaluate_file(loaded, args.data, args.format, args.max_length, args.batch_size, args.max_new_tokens, accelerator)
        result["model"] = loaded.description
        if accelerator.is_main_process:
            print(metrics_table(result), flush=True)
            if args.json:
                from .deploy.atomic import write_text

                write_text(args.json, json.dumps(result, indent=2) + "\n")
        finished = True
    finally:
        engine.end_of_run(finished)
    return 0


def lm_eval_main(args: argparse.Namespace) -> int:
    """sora eval --lm-eval: the harness's tasks on the model loaded as for --data (base + adapter, or merged)."""
    misplaced = [flag for flag, value in (("--format", args.format), ("--max-length", args.max_length), ("--max-new-tokens", args.max_new_tokens))
                 if value is not None]  # fmt: skip
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only with --data (lm-evaluation-harness tasks set their own)")
    from . import harness

    harness.one_process()
    harness.require_lm_eval()
    tasks = harness.parse_tasks(args.lm_eval)
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json}: is a folder, not a file")
    from .inference import resolve_sources

    _, _, run_config = resolve_sources(args.model, args.base, args.adapter)
    manager = harness.task_manager(args.lm_eval_include)
    harness.check_tasks(manager, tasks)
    loaded = load_from(args)
    batch_size = args.batch_size or loaded.data_settings.eval_batch_size
    mixed = ((run_config or {}).get("distributed") or {}).get("mixed_precision")
    if args.apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise ValueError(f"--apply-chat-template: the tokenizer of {loaded.description} has no chat template")
    results = harness.run_tasks(loaded, tasks, manager, batch_size, args.num_fewshot, args.limit, mixed,
                                chat=args.apply_chat_template, system=args.system_instruction)  # fmt: skip
    print(harness.results_table(results), flush=True)
    if args.json:
        harness.write_results(args.json, results)
    return 0


def non_negative_int(value: str) -> int:
    return whole_number(value, "a whole number >= 0")


def whole_number(value: str, expected: str) -> int:
    """``value`` as an int >= 0, else argparse's error saying what was ``expected``."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def finish_processes() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "train": train_main, "merge": merge_main, "export": export_main, "chat": chat_main, "generate": generate_main, "eval": eval_main,
}  # fmt: skip
SUMMARIES = {
    "train": "fine-tune a model with SoRA as a YAML run config says (as sora-train)",
    "merge": "prune, fold and merge an adapter into the base weights (as sora-merge)",
    "export": "export an adapter to another format, e.g. PEFT LoRA (as sora-export)",
    "chat": "talk to a trained model: multi-turn, streamed, with its chat template",
    "generate": "complete every row of a data file into JSON lines (batched; split across processes under a launcher)",
    "eval": "loss, perplexity and answer accuracy on a data file, computed as training's evaluation; or lm-evaluation-harness tasks",
}


def sora_help() -> str:
    width = max(map(len, SUMMARIES))
    lines = ["usage: sora <command> [options]   (sora <command> --help: the command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in SUMMARIES.items()]
    return "\n".join(lines)


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


def main(argv: Sequence[str] | None = None, prog: str = "python -m sora_dist.cli") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the command: pass it on after it.
    launcher = [a for a in argv if a.startswith(("--local_rank", "--local-rank"))]
    argv = [a for a in argv if a not in launcher]
    if argv and argv[0] in ("-h", "--help"):
        print(sora_help().replace("usage: sora", f"usage: {prog}", 1).replace("sora <command> --help", f"{prog} <command> --help"))
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: {prog} {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        if argv:
            print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run(COMMANDS[argv[0]], argv[1:] + (launcher if argv[0] == "train" else []))


def sora_entry() -> None:
    sys.exit(main(prog="sora"))


def train_entry() -> None:
    sys.exit(run(train_main))


def merge_entry() -> None:
    sys.exit(run(merge_main))


def export_entry() -> None:
    sys.exit(run(export_main))


if __name__ == "__main__":
    sys.exit(main())
