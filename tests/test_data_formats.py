"""Data formats (sora_dist.data): what each data shape tokenizes to and where its loss goes (chat:
assistant turns, instruction: the output, text: every token, classification: one label), padding
masks, errors that name file and row, and the seeded hold-out split."""

from __future__ import annotations

import json

import pytest
from helpers import word_tokenizer
from tokenizers import pre_tokenizers

from sora_dist.data import IGNORE, DataError, split_holdout, tokenize_file
from sora_dist.data.collate import pad_collate

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "hello there how are you fine thanks bye goodbye good great movie bad film it was say hi two one plus add".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a chat template, built locally: one token per word."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return word_tokenizer(specials + WORDS + ["\n", "+", "1", "2", ":"], chat_template=CHAT_TEMPLATE, pre_tokenizer=split)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labeled_words(tokenizer, example) -> list[str]:
    return tokenizer.convert_ids_to_tokens([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


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
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
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
