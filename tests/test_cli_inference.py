"""sora chat / generate / eval (sora_dist.cli, sora_dist.inference) on a tiny chat run trained once per
module: replies and completions equal to model.generate on base + adapter built here, unmerged and
merged; the 2-process generate file byte-identical to the 1-process one; eval's loss and accuracy
equal to the training loop's evaluation and to generate_answers/answer_accuracy; the `sora` entry
point's help and its one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import REPO, WORDS, save_tiny_model, tiny_llama, word_tokenizer, worker_env, write_config

from sora_dist.cli import chat_main, eval_main, generate_main, main, merge_main, run, train_main

CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|> assistant {% endif -%}"
)
ROLES = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
NEW_TOKENS = 6


def words(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (n,), generator=g))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A chat-format run: 16 conversations whose assistant answers 'w100 w101', 20 steps, a separate
    validation file evaluated with generated answers at the end. Returns (folder, model dir, tmp)."""
    tmp = tmp_path_factory.mktemp("chat_run")
    tokenizer = word_tokenizer(ROLES + WORDS, chat_template=CHAT_TEMPLATE)
    model_dir = save_tiny_model(tmp / "model", tiny_llama(seed=0), tokenizer)
    g = torch.Generator().manual_seed(0)

    def conversation():
        return {"messages": [{"role": "user", "content": words(g, 4)}, {"role": "assistant", "content": "w100 w101"}]}

    train = write_jsonl(tmp / "chat.jsonl", [conversation() for _ in range(16)])
    val = write_jsonl(tmp / "val.jsonl", [conversation() for _ in range(6)])
    config = write_config(tmp, model_dir, steps=20)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"format": "chat", "train_file": str(train), "validation_file": str(val), "max_length": 32,
                   "eval_generate_tokens": 4, "eval_batch_size": 4}  # fmt: skip
    config.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(config)]) == 0
    return tmp / "out", model_dir, tmp


def reference_model(model_dir, run_dir, merged: bool = False):
    from transformers import AutoModelForCausalLM

    from sora_dist import load_sora, merge_sora

    model = load_sora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), run_dir / "adapter").eval()
    if merged:
        merge_sora(model)
    return model


@torch.no_grad()
def greedy(model, tokenizer, ids: list[int], tokens: int = NEW_TOKENS) -> str:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def reference_chat(model, tokenizer, lines: list[str], system: str | None = None) -> list[str]:
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for line in lines:
        messages.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        reply = greedy(model, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        messages.append({"role": "assistant", "content": reply.strip()})
        replies.append(reply.replace("\n", " "))
    return replies


def test_chat_piped_replies_equal_generate_unmerged_merged_and_as_a_process(chat_run, capsys):
    from transformers import AutoTokenizer

    run_dir, model_dir, _ = chat_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = ["w1 w2 w3", "w4 w5", "w6"]
    want = reference_chat(reference_model(model_dir, run_dir), tokenizer, lines, system="w9 w10")
    piped = "\n".join(lines) + "\n"

    assert chat_main([str(run_dir), "--system", "w9 w10", "--max-new-tokens", str(NEW_TOKENS)], stdin=io.StringIO(piped)) == 0
    assert capsys.readouterr().out.splitlines() == want
    assert chat_main([str(run_dir), "--system", "w9 w10", "--max-new-tokens", str(NEW_TOKENS), "--merge"], stdin=io.StringIO(piped)) == 0
    assert capsys.readouterr().out.splitlines() == want
    # /reset forgets the conversation (the system message stays), /exit ends the session.
    again = "w1 w2 w3\n/reset\nw1 w2 w3\n/exit\nw4 w5\n"
    assert chat_main([str(run_dir), "--system", "w9 w10", "--max-new-tokens", str(NEW_TOKENS)], stdin=io.StringIO(again)) == 0
    assert capsys.readouterr().out.splitlines() == [want[0], want[0]]

    # A model folder written by sora-merge is a plain transformers folder.
    merged = run_dir.parent / "merged"
    assert run(merge_main, ["--base", str(model_dir), "--adapter", str(run_dir), "--out", str(merged), "--force"]) == 0
    capsys.readouterr()
    assert chat_main([str(merged), "--system", "w9 w10", "--max-new-tokens", str(NEW_TOKENS)], stdin=io.StringIO(piped)) == 0
    assert capsys.readouterr().out.splitlines() == want

    no_system = reference_chat(reference_model(model_dir, run_dir), tokenizer, lines[:2])
    proc = subprocess.run([sys.executable, "-m", "sora_dist.cli", "chat", str(run_dir), "--max-new-tokens", str(NEW_TOKENS)],
                          input="\n".join(lines[:2]) + "\n", cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines() == no_system


def test_generate_writes_rows_with_the_completions_of_generate(chat_run, tmp_path):
    from transformers import AutoTokenizer

    from sora_dist.data.formats import encode_instruction

    run_dir, model_dir, tmp = chat_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = reference_model(model_dir, run_dir)
    g = torch.Generator().manual_seed(5)
    user = [{"role": "user", "content": words(g, 3)} for _ in range(5)]
    chats = [{"messages": [user[0], {"role": "assistant", "content": "w100"}], "id": 0},
             {"messages": [user[1]], "id": 1},
             {"messages": [user[2], {"role": "assistant", "content": "w7"}, user[3]], "id": 2},
             {"messages": [{"role": "system", "content": "w5"}, user[4], {"role": "assistant", "content": "w8 w9"}], "id": 3},
             {"messages": [user[0]], "id": 4}]  # fmt: skip
    instructions = [{"instruction": words(g, 1 + i % 4), "input": words(g, 2) if i % 2 else "", "output": "w1"} for i in range(5)]
    texts = [{"text": words(g, 1 + i % 5)} for i in range(5)]

    def chat_ids(row):
        messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    def instruction_ids(row):
        encoded = encode_instruction(row, tokenizer, "test")
        return encoded["input_ids"][: encoded["prompt_length"]]

    for name, rows, ids_of in (("chat", chats, chat_ids), ("instruction", instructions, instruction_ids),
                               ("text", texts, lambda row: tokenizer(row["text"])["input_ids"])):  # fmt: skip
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / f"{name}.out.jsonl"
        assert run(generate_main, [str(run_dir), "--data", str(data), "--out", str(out), "--batch-size", "2",
                                   "--max-new-tokens", str(NEW_TOKENS)]) == 0  # fmt: skip
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [{k: v for k, v in row.items() if k != "completion"} for row in got] == rows, name
        assert [row["completion"] for row in got] == [greedy(model, tokenizer, ids_of(row)) for row in rows], name

    # Two processes (torchrun over gloo) write the same file, byte for byte, as one process.
    data = tmp_path / "chat.jsonl"
    args = ["-m", "sora_dist.cli", "generate", str(run_dir), "--data", str(data), "--batch-size", "2", "--max-new-tokens", str(NEW_TOKENS)]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.jsonl")], cwd=REPO, env=worker_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                          "--out", str(tmp_path / "two.jsonl")], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "one.jsonl").read_text().splitlines() == (tmp_path / "chat.out.jsonl").read_text().splitlines()


def test_eval_equals_the_training_evaluation_and_answer_accuracy(chat_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from sora_dist.data import tokenize_file
    from sora_dist.training.evaluate import answer_accuracy, generate_answers

    run_dir, model_dir, tmp = chat_run
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if r["kind"] == "eval"][-1]
    assert final["step"] == 20
    out = tmp_path / "eval.json"
    assert run(eval_main, [str(run_dir), "--data", str(tmp / "val.jsonl"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "eval_loss" in table and "generated_accuracy" in table
    result = json.loads(out.read_text())
    assert result["format"] == "chat" and result["examples"] == 6
    assert result["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    assert result["generated_accuracy"] == final["generated_accuracy"]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = reference_model(model_dir, run_dir)
    examples = tokenize_file(tmp / "val.jsonl", tokenizer, "chat", 32).rows
    assert result["generated_accuracy"] == answer_accuracy(generate_answers(model, examples, tokenizer, 4, 4, "cpu"), examples, tokenizer)

    # Instruction data, merged model, explicit --base/--adapter: accuracy as generate_answers gives it.
    g = torch.Generator().manual_seed(3)
    rows = [{"instruction": words(g, 3), "input": "", "output": "w100 w101" if i % 2 else words(g, 2)} for i in range(6)]
    data = write_jsonl(tmp_path / "instructions.jsonl", rows)
    assert run(eval_main, ["--base", str(model_dir), "--adapter", str(run_dir), "--merge", "--data", str(data),
                           "--max-new-tokens", "3", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    examples = tokenize_file(data, tokenizer, "instruction", 32).rows
    assert result["format"] == "instruction" and result["examples"] == 6
    assert result["generated_accuracy"] == answer_accuracy(generate_answers(model, examples, tokenizer, 16, 3, "cpu"), examples, tokenizer)


def test_sora_help_lists_the_commands_and_mistakes_are_one_error_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-c", "from sora_dist.cli import sora_entry; sora_entry()", "--help"], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["train", "merge", "export", "chat", "generate", "eval"]
    assert all(len(line.split()) > 3 for line in proc.stdout.splitlines() if line.startswith("  "))

    missing = tmp_path / "no_such_run"
    for argv in (["chat", str(missing)], ["generate", str(missing), "--data", str(missing), "--out", str(tmp_path / "o.jsonl")],
                 ["eval", str(missing), "--data", str(missing)], ["chat"], ["nonsense"]):  # fmt: skip
        assert main(argv, prog="sora") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert sum(line.startswith("error: ") for line in err) == 1, err
        assert "Traceback" not in "\n".join(err)
