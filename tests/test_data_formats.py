"""Data pipelines and run-config validation: loss masks per data shape, errors that name their place."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sora_dist.config import ConfigError, load_config
from sora_dist.data import IGNORE, DataError, pad_collate, split_holdout, tokenize_file

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "hello there how are you fine thanks bye goodbye good great movie bad film it was say hi two one plus add".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a chat template, built locally: one token per word."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {word: i for i, word in enumerate(specials + WORDS + ["\n", "+", "1", "2", ":"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labeled_words(tokenizer, example) -> list[str]:
    return tokenizer.convert_ids_to_tokens([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE])


def test_chat_loss_only_on_assistant_turns(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "say hi"},
        {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "goodbye"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    example = tokenize_file(path, tokenizer, "chat", 256)[0]
    # Independent expectation: each assistant turn's words and its end-of-turn token, nothing else.
    assert labeled_words(tokenizer, example) == ["fine", "thanks", "</s>", "goodbye", "</s>"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_instruction_loss_only_on_output(tokenizer, tmp_path):
    path = tmp_path / "ins.csv"
    path.write_text("instruction,input,output\nadd,1 + 1,two\nsay hi,,hi there\n")
    examples = tokenize_file(path, tokenizer, "instruction", 256)
    assert labeled_words(tokenizer, examples[0]) == ["two", "</s>"]
    assert labeled_words(tokenizer, examples[1]) == ["hi", "there", "</s>"]
    assert tokenizer.convert_ids_to_tokens(examples[0]["input_ids"][:4]) == ["add", "1", "+", "1"]


def test_text_labels_every_token_and_truncates(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "it was a great movie"}, {"text": " ".join(["good"] * 50)}])
    examples = tokenize_file(path, tokenizer, "text", max_length=10)
    assert examples[0]["labels"] == examples[0]["input_ids"]
    assert len(examples[1]["input_ids"]) == 10 and examples[1]["attention_mask"] == [1] * 10


def test_classification_labels_and_pairs(tokenizer, tmp_path):
    rows = [
        {"text": "great movie", "label": "positive"},
        {"text": "bad film", "text_pair": "it was bad", "label": "negative"},
    ]
    examples = tokenize_file(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, "classification", 64)
    assert examples.label_names == ["negative", "positive"]
    assert [e["labels"] for e in examples] == [1, 0]
    assert len(examples[1]["input_ids"]) == len(tokenizer("bad film", "it was bad")["input_ids"])
    batch = pad_collate(examples.rows, tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0]


def test_pad_collate_masks_padding(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}, {"text": "it was a good film"}])
    batch = pad_collate(tokenize_file(path, tokenizer, "text", 64).rows, tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1, 1] + [0] * 6
    assert batch["labels"][0, 2:].eq(IGNORE).all()


def test_malformed_row_names_file_and_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "positive"}, {"txt": "bad", "label": "negative"}])
    with pytest.raises(DataError, match=r"c\.jsonl:row 2: missing field 'text'"):
        tokenize_file(path, tokenizer, "classification", 64)
    examples = tokenize_file(path, tokenizer, "classification", 64, on_error="skip")
    assert len(examples) == 1 and list(examples.skipped) == [f"{path}:row 2"]


def test_invalid_json_line_names_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good"}, '{"text": "oops"', {"text": "fine"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:row 2"):
        tokenize_file(path, tokenizer, "text", 64)


def test_chat_without_assistant_is_reported(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 1: no assistant message"):
        tokenize_file(path, tokenizer, "chat", 64)


def test_holdout_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["good"] * (i + 1))} for i in range(20)])
    examples = tokenize_file(path, tokenizer, "text", 64)
    train, val = split_holdout(examples, 0.25, seed=3)
    again, _ = split_holdout(examples, 0.25, seed=3)
    lengths = lambda part: sorted(len(e["input_ids"]) for e in part.rows)  # noqa: E731
    assert len(val) == 5 and len(train) == 15
    assert sorted(lengths(train) + lengths(val)) == lengths(examples)
    assert lengths(train) == lengths(again)


BASE = {"model": {"path": "some/model"}, "data": {"train_file": "train.jsonl"}}


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("train", {"lrr": 1e-4}, r"^train\.lrr: unknown key; allowed keys: .*\blr\b"),
        ("train", {"lr": "fast"}, r"^train\.lr: expected float, got str 'fast'"),
        ("train", {"steps": 2.5}, r"^train\.steps: expected int"),
        ("sora", {"r": 0}, r"^sora\.r must be a positive integer"),
        ("sora", {"gate_init": "zeros"}, r"^sora\.gate_init must be one of"),
        ("data", {"train_file": "t.jsonl", "format": "xml"}, r"^data\.format: must be one of \['instruction', 'chat', 'text', 'classification'\]"),
        ("model", {"path": "m", "quantization": "3bit"}, r"^model\.quantization: must be one of"),
        ("model", {}, r"^model\.path: required"),
    ],
)
def test_config_errors_name_the_key(section, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={**BASE, section: value})


def test_config_overrides_and_unknown_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: some/model\ndata:\n  train_file: t.jsonl\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(path, overrides=["train.lr=3e-4", "sora.target_modules=[q_proj, v_proj]"])
    assert config.train.lr == 3e-4 and config.sora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"^optimiser: unknown section"):
        load_config(raw={**BASE, "optimiser": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)
