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


def test_a_cache_entry_of_an_older_pipeline_version_is_not_loaded(tokenizer, tmp_path, monkeypatch):
    """An entry written under the previous version (whose masks differ) sits in the cache under the
    same inputs; the current version tokenizes afresh and gets the right labels."""
    path = str(write_jsonl(tmp_path / "i.jsonl", [{"instruction": "it was a great movie", "output": "pos"}]))
    right = prepare_split([path], "data.train_file", tokenizer, "instruction", 64, cache=False).rows
    real_call = pipeline_module.Encoder.__call__

    def old_masks(self, batch):  # what a stale entry holds: every token labelled
        out = real_call(self, batch)
        out["labels"] = [list(ids) for ids in out["input_ids"]]
        return out

    monkeypatch.setattr(pipeline_module, "PIPELINE_VERSION", pipeline_module.PIPELINE_VERSION - 1)
    monkeypatch.setattr(pipeline_module.Encoder, "__call__", old_masks)
    stale = prepare_split([path], "data.train_file", tokenizer, "instruction", 64)
    assert stale.rows != right
    monkeypatch.undo()
    monkeypatch.setenv("SORA_DIST_DATA_CACHE", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    current = prepare_split([path], "data.train_file", tokenizer, "instruction", 64)
    assert current.rows == right
    assert len(list((tmp_path / "cache").iterdir())) == 2, "the current version writes its own entry"


@pytest.mark.parametrize("fmt, rows", [
    ("instruction", [{"instruction": "good film", "output": "pos"}, {"instruction": "bad film", "output": ""}, {"instruction": "bad", "output": "  "}]),
    ("text", [{"text": "good film"}, {"text": ""}, {"text": "\n"}]),
])  # fmt: skip
def test_rows_with_an_empty_answer_or_text_have_no_label(tokenizer, tmp_path, fmt, rows):
    """They used to train on the end-of-sequence token alone: now they are skipped and counted, or
    stop the run under on_error: fail."""
    path = str(write_jsonl(tmp_path / "e.jsonl", rows))
    kept = prepare_split([path], "data.train_file", tokenizer, fmt, 64, on_error="skip", cache=False)
    assert len(kept) == 1 and kept.stats["no_label"] == 2 and kept.stats["skipped"] == 2
    assert sorted(kept.skipped) == [f"{path}:row 2", f"{path}:row 3"]
    with pytest.raises(DataError, match=r"e\.jsonl:row 2: empty '(output|text)', nothing to learn"):
        prepare_split([path], "data.train_file", tokenizer, fmt, 64, cache=False)


def test_stats_count_tokens_labels_and_truncated_rows(tokenizer, tmp_path):
    rows = [{"instruction": "it was a great movie the plot", "output": "good acting"}, {"instruction": "bad", "output": "neg"}]
    path = str(write_jsonl(tmp_path / "i.jsonl", rows))
    examples = prepare_split([path], "data.train_file", tokenizer, "instruction", 8)
    stats = examples.stats
    want_tokens = sum(len(r["input_ids"]) for r in examples.rows)
    want_labelled = sum(sum(label != -100 for label in r["labels"]) for r in examples.rows)
    assert stats == {"rows": 2, "tokens": want_tokens, "labelled_tokens": want_labelled, "truncated": 1, "no_label": 0, "skipped": 0}
    assert want_tokens == 8 + 3  # the first row cut at 8 tokens; the second is "bad", "neg", </s>


def test_a_classification_set_with_one_class_gets_a_warning(tokenizer, tmp_path, capsys):
    path = str(write_jsonl(tmp_path / "c.jsonl", [{"text": "good film", "label": "pos"}, {"text": "fine film", "label": "pos"}]))
    prepare_split([path], "data.train_file", tokenizer, "classification", 64, cache=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "every row has the label 'pos'" in lines[0]
    two = str(write_jsonl(tmp_path / "d.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]))
    prepare_split([two], "data.train_file", tokenizer, "classification", 64, cache=False)
    assert "warning:" not in capsys.readouterr().out
