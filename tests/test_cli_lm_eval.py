"""sora eval --lm-eval (sora_dist.cli, sora_dist.harness): an lm-evaluation-harness multiple-choice task
written here (a YAML over a local JSON lines file) run on a tiny trained run folder, its reported
accuracy equal to the one computed with plain torch on base + adapter loaded here; and the one-line
errors of a missing choice between --data and --lm-eval and of a missing harness."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from helpers import WORDS, write_config

from sora_dist.cli import eval_main, main, run, train_main

POOL = 40  # candidate documents
DOCS = 12  # of them in the task's file
LIMIT = 10
BATCH = 4


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """The tiny model fine-tuned with SoRA for 8 steps (helpers.write_config). Returns (run folder, model dir)."""
    tmp = tmp_path_factory.mktemp("lm_eval_run")
    config = write_config(tmp, tiny_model_dir, steps=8)
    assert run(train_main, [str(config)]) == 0
    return tmp / "out", tiny_model_dir


def reference_model(model_dir, run_dir):
    from transformers import AutoModelForCausalLM

    from sora_dist import load_sora

    return load_sora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), run_dir / "adapter").eval()


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(choice | context) for each choice: the sum of the log-probabilities of its tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for choice in choices:
        choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + choice_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(choice_ids))
        scores.append(sum(float(logprobs[p, t]) for p, t in zip(positions, choice_ids)))
    return scores


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def write_task(folder, data, name: str = "sora_tiny_mc") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf_datasets")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def test_lm_eval_accuracy_equals_the_loglikelihoods_of_base_plus_adapter(tiny_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, model_dir = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = reference_model(model_dir, run_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(5)

    def words(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, 100, (n,), generator=g))

    # Candidates scored with plain torch, with and without the adapter; the documents where the adapter
    # changes the preferred choice come first, so that scoring the base alone gives another accuracy.
    pool = []
    for i in range(POOL):
        doc = {"context": words(5), "choices": [words(1 + (k + i) % 3) for k in range(4)]}
        ours = argmax(choice_loglikelihoods(model, tokenizer, doc["context"], doc["choices"]))
        plain = argmax(choice_loglikelihoods(base, tokenizer, doc["context"], doc["choices"]))
        pool.append((doc, ours, plain))
    pool.sort(key=lambda entry: entry[1] == entry[2])
    docs, predicted, base_predicted = map(list, zip(*pool[:DOCS]))
    # The adapter's choice is the target where it differs from the base's, and of every other remaining document.
    for i, doc in enumerate(docs):
        differs = predicted[i] != base_predicted[i]
        doc["label"] = predicted[i] if differs or i % 2 == 0 else (predicted[i] + 1 + i % 3) % 4
    expected = sum(predicted[i] == docs[i]["label"] for i in range(LIMIT)) / LIMIT
    base_accuracy = sum(base_predicted[i] == docs[i]["label"] for i in range(LIMIT)) / LIMIT
    assert 0 < expected < 1 and base_accuracy != expected
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    write_task(tmp_path / "tasks", data)

    out = tmp_path / "lm_eval.json"
    assert eval_main([str(run_dir), "--lm-eval", "sora_tiny_mc", "--lm-eval-include", str(tmp_path / "tasks"), "--limit", str(LIMIT),
                      "--batch-size", str(BATCH), "--json", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr"]
    row = [line.split() for line in table[1:] if line.split()[:2] == ["sora_tiny_mc", "acc"]]
    assert len(row) == 1 and float(row[0][2]) == pytest.approx(expected, abs=1e-4)

    result = json.loads(out.read_text())
    metrics = result["results"]["sora_tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(expected, abs=1e-12)
    assert float(row[0][3]) == pytest.approx(metrics["acc_stderr,none"], abs=1e-4)
    assert result["n-samples"]["sora_tiny_mc"] == {"original": DOCS, "effective": LIMIT}
    assert "pruned to its live ranks" in result["model"]

    # The base model alone, merged base + adapter: the accuracies their choices give.
    for argv, wanted in ((["--base", str(model_dir)], base_accuracy), ([str(run_dir), "--merge"], expected)):
        assert eval_main([*argv, "--lm-eval", "sora_tiny_mc", "--lm-eval-include", str(tmp_path / "tasks"), "--limit", str(LIMIT),
                          "--json", str(out)]) == 0  # fmt: skip
        assert json.loads(out.read_text())["results"]["sora_tiny_mc"]["acc,none"] == pytest.approx(wanted, abs=1e-12)


def test_eval_needs_data_or_lm_eval_and_the_harness_one_error_line(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "no_such_run")
    for argv, wanted in ((["eval", missing], "give --data FILE"), (["eval", missing, "--data", "d.jsonl", "--lm-eval", "t"], "not both"),
                         (["eval", missing, "--data", "d.jsonl", "--limit", "3"], "--limit: only with --lm-eval")):  # fmt: skip
        assert main(argv, prog="sora") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and wanted in err[0], err

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval fails as when it is not installed
    assert main(["eval", missing, "--lm-eval", "hellaswag"], prog="sora") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lm-eval needs lm-evaluation-harness: pip install 'sora_dist[lmeval]'"]


CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")  # fmt: skip


def test_apply_chat_template_scores_each_prompt_as_a_user_turn_after_the_system_instruction(tiny_run, tmp_path, capsys):
    """With --apply-chat-template the context is the tokenizer's rendering of [system, user] plus the generation
    prompt: the reported accuracy is the one plain torch gives on that rendering, not on the raw prompt."""
    pytest.importorskip("lm_eval")
    import shutil

    from transformers import AutoTokenizer

    run_dir, model_dir = tiny_run
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(base)
    model = reference_model(base, run_dir)

    g = torch.Generator().manual_seed(11)

    def words(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, 100, (n,), generator=g))

    system = words(3)
    docs, rendered_right, raw_right = [], 0, 0
    for i in range(DOCS):
        doc = {"context": words(4), "choices": [words(1 + (k + i) % 2) for k in range(3)]}
        chat = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": doc["context"]}],
                                             tokenize=False, add_generation_prompt=True)  # fmt: skip
        with_template = argmax(choice_loglikelihoods(model, tokenizer, chat, doc["choices"]))
        raw = argmax(choice_loglikelihoods(model, tokenizer, doc["context"], doc["choices"]))
        doc["label"] = with_template if i % 3 else (with_template + 1) % 3
        rendered_right += with_template == doc["label"]
        raw_right += raw == doc["label"]
        docs.append(doc)
    assert rendered_right != raw_right  # the test tells the two renderings apart
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    write_task(tmp_path / "tasks", data)

    out = tmp_path / "chat.json"
    common = ["--base", str(base), "--adapter", str(run_dir / "adapter"), "--lm-eval", "sora_tiny_mc", "--lm-eval-include", str(tmp_path / "tasks"),
              "--json", str(out)]  # fmt: skip
    assert eval_main([*common, "--apply-chat-template", "--system-instruction", system]) == 0
    assert json.loads(out.read_text())["results"]["sora_tiny_mc"]["acc,none"] == pytest.approx(rendered_right / DOCS, abs=1e-12)
    assert eval_main(common) == 0
    assert json.loads(out.read_text())["results"]["sora_tiny_mc"]["acc,none"] == pytest.approx(raw_right / DOCS, abs=1e-12)
    capsys.readouterr()

    assert main(["eval", str(run_dir), "--data", str(data), "--apply-chat-template"], prog="sora") == 2
    assert "--apply-chat-template: only with --lm-eval" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--lm-eval", "sora_tiny_mc", "--lm-eval-include", str(tmp_path / "tasks"), "--apply-chat-template"],
                prog="sora") == 2  # fmt: skip
    assert "has no chat template" in capsys.readouterr().err
