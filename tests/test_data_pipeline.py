"""The data pipeline (sora_dist.data.pipeline): every kind of source, several sources concatenated or
mixed with seeded weights, column renaming, the on-disk cache (a rerun does not tokenize again and
gets the same rows; changed data gets a new entry), memory-mapped results, rows without labels after
truncation, and errors that name the source, the row or what to download."""

from __future__ import annotations

import json

import pytest
from helpers import word_tokenizer

from sora_dist.data import DataError, prepare_split
from sora_dist.data import pipeline as pipeline_module

WORDS = "it was a great movie bad film good fine the plot acting pos neg".split()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    """Each test its own tokenized-data cache."""
    monkeypatch.setenv("SORA_DIST_DATA_CACHE", str(tmp_path / "cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def texts(examples, tokenizer) -> list[str]:
    return [" ".join(t for t in tokenizer.convert_ids_to_tokens(row["input_ids"]) if t != "</s>") for row in examples.rows]


ROWS_A = [{"text": "it was a great movie"}, {"text": "bad film"}, {"text": "the plot was fine"}]
ROWS_B = [{"text": "good acting"}, {"text": "bad plot"}]


def test_a_saved_dataset_folder_equals_the_same_rows_in_a_file(tokenizer, tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS_A).save_to_disk(str(tmp_path / "saved"))
    from_folder = prepare_split([str(tmp_path / "saved")], "data.train_file", tokenizer, "text", 64, cache=False)
    from_file = prepare_split([str(write_jsonl(tmp_path / "a.jsonl", ROWS_A))], "data.train_file", tokenizer, "text", 64, cache=False)
    assert from_folder.rows == from_file.rows and len(from_file) == 3


def test_sources_concatenate_in_order_and_weighted_mixing_is_seeded(tokenizer, tmp_path):
    a, b = str(write_jsonl(tmp_path / "a.jsonl", ROWS_A)), str(write_jsonl(tmp_path / "b.jsonl", ROWS_B))
    both = prepare_split([a, b], "data.train_file", tokenizer, "text", 64, cache=False)
    assert texts(both, tokenizer) == [r["text"] for r in ROWS_A + ROWS_B]
    mixed = [texts(prepare_split([a, b], "data.train_file", tokenizer, "text", 64, weights=[1, 3], seed=s, cache=False), tokenizer) for s in (0, 0, 1)]
    assert mixed[0] == mixed[1], "the same seed mixes the same way"
    assert mixed[0] != mixed[2]
    assert set(mixed[0]) == {r["text"] for r in ROWS_A + ROWS_B}, "every row of every source is seen"


def test_columns_are_renamed_and_missing_ones_name_the_source(tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "reviews.jsonl", [{"review": r["text"]} for r in ROWS_A]))
    renamed = prepare_split([path], "data.train_file", tokenizer, "text", 64, columns={"text": "review"}, cache=False)
    assert texts(renamed, tokenizer) == [r["text"] for r in ROWS_A]
    with pytest.raises(DataError, match=r"reviews\.jsonl'.*needs the column\(s\) text; the data has \['review'\].*data\.columns"):
        prepare_split([path], "data.train_file", tokenizer, "text", 64, cache=False)
    with pytest.raises(DataError, match=r"data\.columns names 'comment', which is not a column"):
        prepare_split([path], "data.train_file", tokenizer, "text", 64, columns={"text": "comment"}, cache=False)


def test_a_hub_set_that_is_not_available_offline_says_what_to_download(tokenizer):
    with pytest.raises(DataError, match=r"data\.train_file 'nobody/no-such-set@train_sft'.*huggingface-cli download --repo-type dataset nobody/no-such-set"):
        prepare_split(["nobody/no-such-set@train_sft"], "data.train_file", tokenizer, "text", 64, cache=False)
    with pytest.raises(DataError, match=r"data\.train_file 'missing\.jsonl': no such file or folder"):
        prepare_split(["missing.jsonl"], "data.train_file", tokenizer, "text", 64, cache=False)


def test_the_cache_is_reused_and_memory_mapped_and_follows_the_content(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS_A)
    first = prepare_split([str(path)], "data.train_file", tokenizer, "text", 64)
    assert first.dataset.cache_files and all(str(tmp_path / "cache") in f["filename"] for f in first.dataset.cache_files)

    def no_tokenizing(self, batch):
        raise AssertionError("tokenized again although the inputs did not change")

    monkeypatch.setattr(pipeline_module.Encoder, "__call__", no_tokenizing)
    again = prepare_split([str(path)], "data.train_file", tokenizer, "text", 64)
    assert again.rows == first.rows
    monkeypatch.undo()
    monkeypatch.setenv("SORA_DIST_DATA_CACHE", str(tmp_path / "cache"))
    write_jsonl(path, ROWS_B)
    changed = prepare_split([str(path)], "data.train_file", tokenizer, "text", 64)
    assert texts(changed, tokenizer) == [r["text"] for r in ROWS_B]
    shorter = prepare_split([str(path)], "data.train_file", tokenizer, "text", 1)
    assert [len(r["input_ids"]) for r in shorter.rows] == [1, 1], "max_length is part of the key"


def test_rows_without_labels_after_truncation_are_dropped_and_counted(tokenizer, tmp_path):
    rows = [{"instruction": "it was a great movie", "output": "pos"}, {"instruction": "bad", "output": "neg"}]
    path = str(write_jsonl(tmp_path / "i.jsonl", rows))
    kept = prepare_split([path], "data.train_file", tokenizer, "instruction", 4, on_error="skip", cache=False)
    assert len(kept) == 1 and kept.skipped_count == 1
    assert kept.skipped == {f"{path}:row 1": "no labelled token left after truncation to max_length=4, so nothing to learn"}
    with pytest.raises(DataError, match=r"i\.jsonl:row 1: no labelled token left after truncation to max_length=4"):
        prepare_split([path], "data.train_file", tokenizer, "instruction", 4, cache=False)


def test_a_bad_row_in_the_second_source_names_that_source(tokenizer, tmp_path):
    a = str(write_jsonl(tmp_path / "a.jsonl", ROWS_A))
    b = str(write_jsonl(tmp_path / "b.jsonl", [{"text": "good acting"}, {"text": None}]))
    with pytest.raises(DataError, match=r"b\.jsonl:row 2: missing field 'text'"):
        prepare_split([a, b], "data.train_file", tokenizer, "text", 64, cache=False)
    skipped = prepare_split([a, b], "data.train_file", tokenizer, "text", 64, on_error="skip", cache=False)
    assert len(skipped) == 4 and list(skipped.skipped) == [f"{b}:row 2"]
