"""What is trained, shown as text (sora_dist.data.preview): trained runs of tokens marked against
strings built by hand, spaces and newlines kept at run boundaries, classification rows with their
class name; the figures of a set against sums over its rows; ``sora-train CONFIG --preview [N]``
for every data format without loading the model; the first example printed once by a training run."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import WORDS, word_tokenizer, write_config

from sora_dist.cli import train_main
from sora_dist.data.formats import IGNORE
from sora_dist.data.preview import CLOSE, GREEN, OPEN, RESET, column_sums, data_figures, mark_example


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def segments_to_example(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer.convert_tokens_to_ids(text.split())
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def test_trained_runs_are_bracketed_or_coloured(tokenizer):
    segments = [("w1 w2", False), ("w3 w4", True), ("w5", False), ("w6 </s>", True)]
    ids, labels = segments_to_example(tokenizer, segments)
    # The word tokenizer decodes tokens joined by single spaces; a run's text is what it adds after
    # the text before it, so the space before a trained run is that run's.
    assert mark_example(ids, labels, tokenizer, color=False) == "w1 w2[[ w3 w4]] w5[[ w6 </s>]]"
    assert mark_example(ids, labels, tokenizer, color=True) == f"w1 w2{GREEN} w3 w4{RESET} w5{GREEN} w6 </s>{RESET}"
    everything = tokenizer.convert_tokens_to_ids(["w7", "w8"])
    assert mark_example(everything, everything, tokenizer) == "[[w7 w8]]"
    assert mark_example(everything, [IGNORE, IGNORE], tokenizer) == "w7 w8"


def test_spaces_and_newlines_stay_where_the_tokens_put_them():
    from tokenizers import decoders

    # Tokens that carry their own spaces and newlines, decoded by plain concatenation.
    pieces = ["Q:", " what", "\n", "A:", " yes", "\n", "Q:", " why", "\n", "A:", " because", "\n"]
    fused = word_tokenizer(pieces, eos=None)
    fused.backend_tokenizer.decoder = decoders.Fuse()
    ids = fused.convert_tokens_to_ids(pieces)
    trained = {4, 5, 10, 11}
    labels = [t if i in trained else IGNORE for i, t in enumerate(ids)]
    assert mark_example(ids, labels, fused) == "Q: what\nA:[[ yes\n]]Q: why\nA:[[ because\n]]"

    # Sentencepiece-style tokens: decoding a run alone would drop the space its first token starts with.
    words = ["▁the", "▁answer", "▁is", "▁four"]
    spm = word_tokenizer(words, eos=None)
    spm.backend_tokenizer.decoder = decoders.Metaspace()
    ids = spm.convert_tokens_to_ids(words)
    assert spm.decode(ids[2:]) == "is four"
    assert mark_example(ids, [IGNORE, IGNORE] + ids[2:], spm) == "the answer[[ is four]]"


def test_a_character_split_between_runs_is_shown_once_in_the_later_run():
    from tokenizers import decoders, pre_tokenizers

    (four,) = [piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("四")]
    assert len(four) == 3  # its three UTF-8 bytes as byte-level symbols
    pieces = ["a", four[:2], four[2:], "b"]
    byte_level = word_tokenizer(pieces, eos=None)
    byte_level.backend_tokenizer.decoder = decoders.ByteLevel()
    ids = byte_level.convert_tokens_to_ids(pieces)
    assert byte_level.decode(ids[:2]) == "a\ufffd"
    assert mark_example(ids, [IGNORE, IGNORE, ids[2], ids[3]], byte_level) == "a[[四b]]"
    assert mark_example(ids, [IGNORE, ids[1], ids[2], IGNORE], byte_level) == "a[[四]]b"


def test_a_classification_example_shows_its_text_and_class(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["w1", "w2", "w3"])
    assert mark_example(ids, 1, tokenizer, label_names=["neg", "pos"]) == "w1 w2 w3\n-> label: pos"
    assert mark_example(ids, 2, tokenizer) == "w1 w2 w3\n-> label: 2"
    assert mark_example(ids, 0.25, tokenizer) == "w1 w2 w3\n-> label: 0.25"


def test_a_long_example_is_cut_with_its_size(tokenizer):
    ids, labels = segments_to_example(tokenizer, [("w1 w2 w3", False), ("w4 w5 w6", True)])
    assert mark_example(ids, labels, tokenizer, limit=11) == "w1 w2 w3[[ w4]] ... (6 tokens in all)"
    assert mark_example(ids, labels, tokenizer, limit=5) == "w1 w2 ... (6 tokens in all)"


def test_column_sums_of_a_selection_match_its_rows():
    import datasets

    from sora_dist.data.pipeline import Examples

    rows = [[3 + (i % 7)] * (1 + i % 5) for i in range(50)]
    labels = [[IGNORE] * (len(r) // 2) + r[len(r) // 2 :] for r in rows]
    table = datasets.Dataset.from_dict({"input_ids": rows, "labels": labels, "length": [len(r) for r in rows]})
    picked = [i for i in range(50) if i % 3 == 0][::-1]
    selection = Examples(table, "text").select(picked)
    want_tokens = sum(len(rows[i]) for i in picked)
    want_labelled = sum(sum(1 for x in labels[i] if x != IGNORE) for i in picked)
    assert column_sums(selection) == {"rows": len(picked), "tokens": want_tokens, "labelled_tokens": want_labelled}

    class Plain:  # a set that records no stats: the figures it cannot know are None
        def __init__(self, examples):
            self.dataset, self.format, self.skipped_count = examples.dataset, "instruction", 0

    figures = data_figures(Plain(selection))
    assert (figures["rows"], figures["tokens"], figures["labelled_tokens"]) == (len(picked), want_tokens, want_labelled)
    assert figures["truncated"] is None and figures["no_label"] is None


# -- sora-train CONFIG --preview ---------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--preview loaded the model")

    monkeypatch.setattr("sora_dist.recipe.load_model", refuse)  # first: importing the recipe binds models.load_model
    monkeypatch.setattr("sora_dist.models.load_model", refuse)


def figures_of(out: str, name: str) -> dict[str, int]:
    line, detail = re.search(rf"^{name} set: (.*)\n(.*)$", out, re.M).groups()
    numbers = [int(n.replace(",", "")) for n in re.findall(r"(?<![\d.])(\d[\d,]*)(?![\d.%])", line + " " + detail.split("max_length")[1])]
    keys = ["rows", "tokens", "labelled_tokens", "truncated", "no_label", "skipped"]
    return dict(zip(keys, numbers))


def test_preview_prints_n_examples_and_figures_that_match_the_rows(tiny_model_dir, tmp_path, capsys, no_model):
    config = write_config(tmp_path, tiny_model_dir)
    max_length = 32
    rows = []
    for i in range(20):
        instruction = " ".join(WORDS[(i + k) % 100] for k in range(2 + i % 4))
        output = " ".join(WORDS[(3 * i + k) % 100] for k in range(1 + i % 3))
        rows.append({"instruction": instruction, "input": "", "output": output})
    rows[7]["output"] = "  "  # nothing to learn: dropped
    rows[11]["instruction"] = " ".join(WORDS[:40])  # the answer is cut away: dropped too
    rows[13]["instruction"] = " ".join(WORDS[:30])  # truncated, 2 answer tokens left
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    sets = ["--set", f"data.train_file={data}", "--set", "data.validation_fraction=0", "--set", "data.on_error=skip"]
    assert train_main([str(config), "--preview", "4", *sets]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example ") == 4
    assert "--- example 5 " not in out

    kept, tokens, labelled, truncated = [], 0, 0, 0
    for r in rows:
        prompt, answer = len(r["instruction"].split()), len(r["output"].split()) + 1  # + </s>
        length = min(prompt + answer, max_length)
        trained = max(0, length - prompt)
        if not r["output"].strip() or trained == 0:
            continue
        kept.append(r)
        tokens, labelled, truncated = tokens + length, labelled + trained, truncated + (prompt + answer > max_length)
    figures = figures_of(out, "training")
    assert figures == {"rows": len(kept), "tokens": tokens, "labelled_tokens": labelled, "truncated": truncated, "no_label": 2, "skipped": 2}
    assert f"({100 * labelled / tokens:.1f}%)" in out
    assert "validation set" not in out
    first = kept[0]
    assert f"\n{first['instruction']}{OPEN} {first['output']} </s>{CLOSE}\n" in out

    # Without N: 3 examples; with the held-out part, figures for both sets that add up to the file's.
    assert train_main([str(config), "--preview", "--set", f"data.train_file={data}", "--set", "data.on_error=skip"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example ") == 3
    both = [figures_of(out, "training"), figures_of(out, "validation")]
    assert sum(f["rows"] for f in both) == len(kept)
    assert sum(f["tokens"] for f in both) == tokens
    assert sum(f["labelled_tokens"] for f in both) == labelled


CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|> assistant {% endif -%}"
)
ROLES = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
FORMAT_ROWS = {
    "chat": [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]}] * 4,
    "text": [{"text": "w1 w2 w3"}, {"text": "w4 w5"}] * 2,
    "blocks": [{"text": "w1 w2 w3 w4 w5 w6 w7"}, {"text": "w8 w9 w10 w11 w12 w13 w14"}] * 2,
    "classification": [{"text": "w1 w2", "label": "pos"}, {"text": "w3", "label": "neg"}] * 2,
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_preview_works_for_every_format(fmt, tiny_model_dir, tmp_path, capsys, no_model):
    folder = tmp_path / "tokenizer_only"  # --preview reads the tokenizer; there are no weights to load
    word_tokenizer(ROLES + WORDS, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    config = write_config(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(config.read_text())
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FORMAT_ROWS[fmt]))
    raw["model"]["path"] = str(folder)
    raw["data"].update(format=fmt, train_file=str(data), validation_fraction=0.0, max_length=8 if fmt == "blocks" else 32)
    if fmt == "classification":
        raw["model"]["task"] = "sequence_classification"
    config.write_text(yaml.safe_dump(raw))

    assert train_main([str(config), "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example ") == 2
    examples = re.findall(r"^--- example \d+ of \d+ .*---\n(.*(?:\n-> label: .*)?)$", out, re.M)
    if fmt == "chat":
        assert examples[0] == "<|im_start|> user w1 w2 <|im_end|> <|im_start|> assistant[[ w3 w4 <|im_end|>]]"
    elif fmt == "text":
        assert examples == ["[[w1 w2 w3 </s>]]", "[[w4 w5 </s>]]"]
    elif fmt == "blocks":
        assert examples == ["[[w1 w2 w3 w4 w5 w6 w7 </s>]]", "[[w8 w9 w10 w11 w12 w13 w14 </s>]]"]
        assert figures_of(out, "training")["tokens"] == figures_of(out, "training")["labelled_tokens"]
    else:
        assert examples == ["w1 w2\n-> label: pos", "w3\n-> label: neg"]
        assert "one class label per row" in out


def test_a_training_run_prints_its_first_example_once(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir, steps=1)
    assert train_main([str(config)]) == 0
    out = capsys.readouterr().out
    header = "first training example (trained tokens in [[...]]):"
    assert out.count(header) == 1 and out.count("first training example") == 1
    shown = out.split(header + "\n", 1)[1].splitlines()[0]
    assert re.fullmatch(r"(w\d+ ){4}w\d+\[\[( w\d+){3} </s>\]\]", shown)
