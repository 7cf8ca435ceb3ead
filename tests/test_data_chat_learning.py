"""The chat masks teach the model to answer: a tiny Llama trained on the pipeline's labels learns a
question whose answer can be learned only at the assistant's position, and the labels of the old
text search (the first place the answer's word occurs, inside the question that names both options)
teach it nothing it can use when it answers.

Each question names both colours, in a random order, then an object ("red or blue is plum"); the
colour of each object is fixed. Under the old search the labelled word sits in the options, before
the object is named, so what it teaches cannot depend on the object. Generated-answer accuracy on fresh questions is measured with the
evaluation code (prompt = the conversation up to the assistant turn with the generation prompt).
Chance is 0.5.
"""

from __future__ import annotations

import json
import random

import torch
from helpers import tiny_llama, word_tokenizer

from sora_dist.data import IGNORE, tokenize_file
from sora_dist.data.collate import pad_collate
from sora_dist.training.evaluate import answer_accuracy, generate_answers

MARKERS = ["<|im_start|>", "<|im_end|>"]
OBJECTS = "apple plum sky sea rose lake fire ice".split()
COLOURS = ("red", "blue")
TEMPLATE = (
    "{%- for m in messages -%}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|> assistant {% endif -%}"
)


def chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    colour = {thing: COLOURS[i % 2] for i, thing in enumerate(OBJECTS)}
    rows = []
    for _ in range(n):
        thing = rng.choice(OBJECTS)
        first, second = rng.sample(COLOURS, 2)
        rows.append({"messages": [{"role": "user", "content": f"{first} or {second} is {thing}"},
                                  {"role": "assistant", "content": colour[thing]}]})  # fmt: skip
    return rows


def old_labels(example: dict, answer_id: int) -> dict:
    """The old behaviour: the first occurrence of the answer's word in the conversation is labelled."""
    ids = list(example["input_ids"])
    labels = [IGNORE] * len(ids)
    labels[ids.index(answer_id)] = answer_id
    return {**example, "labels": labels}


def train_and_score(train: list[dict], test: list[dict], tokenizer, steps: int = 60) -> float:
    torch.manual_seed(0)
    model = tiny_llama(seed=0, vocab_size=len(tokenizer), max_position_embeddings=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = pad_collate(rng.sample(train, 16), pad_id=tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    replies = generate_answers(model, test, tokenizer, 32, 2, "cpu")
    return answer_accuracy(replies, test, tokenizer)


def test_answers_are_learned_from_the_turn_and_not_from_labels_on_the_prompt(tmp_path):
    tokenizer = word_tokenizer(MARKERS + ["user", "assistant", "is", "or"] + OBJECTS + list(COLOURS), chat_template=TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    for name, rows in (("train", chats(400, 1)), ("test", chats(64, 2))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = tokenize_file(tmp_path / "train.jsonl", tokenizer, "chat", 32).rows
    test = tokenize_file(tmp_path / "test.jsonl", tokenizer, "chat", 32).rows
    labelled = [tokenizer.convert_ids_to_tokens([t for t in e["labels"] if t != IGNORE]) for e in train[:3]]
    assert all(len(tokens) == 2 and tokens[0] in COLOURS and tokens[1] == "<|im_end|>" for tokens in labelled)

    anchored = train_and_score(train, test, tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    searched = train_and_score([old_labels(e, ids(tokenizer.decode([t for t in e["labels"] if t != IGNORE][:1]))) for e in train], test, tokenizer)
    assert anchored >= 0.9, f"labels on the assistant turn: accuracy {anchored:.2f}"
    assert searched <= 0.7, f"labels on the prompt: accuracy {searched:.2f}"
