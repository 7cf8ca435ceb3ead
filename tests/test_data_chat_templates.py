"""Chat labels land on each assistant turn where the template writes it, for the chat templates of
several families (tests/chat_templates.py: Llama 3, Gemma 3, Mistral with the system prompt in the
first or the last user message, Qwen3 with and without reasoning, DeepSeek-R1 style, Phi-4, and
SmolLM2's own template), on random conversations whose answers repeat words and whole messages of
the system prompt, the questions and other turns.

``sora_dist.data.chat`` is checked against two references it does not use: (a) prefix renders
(``render(messages[:k], add_generation_prompt=True)`` to ``render(messages[:k + 1])``, or to the end
of the text for the last turn), where the template renders prefix by prefix, and (b) the tokenizer's
own assistant mask, from a copy of each template with ``{% generation %}`` around what it writes for
an assistant message. Named cases on SmolLM2's template pin the rows a text search used to mislabel.
"""

from __future__ import annotations

import copy

import chat_templates as T
import pytest
from helpers import require_smollm2
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from sora_dist.data.chat import Renderer, encode_conversation, render, render_conversations
from sora_dist.data.formats import IGNORE, DataError

# name: (template, or None for the tokenizer's own; its {% generation %} copy; prefix-stable; reasoning in the data)
TEMPLATES = {
    "llama3": (T.plain(T.LLAMA3), T.marked(T.LLAMA3), True, False),
    "gemma3": (T.plain(T.GEMMA3), T.marked(T.GEMMA3), True, False),
    "mistral_system_first_user": (T.plain(T.MISTRAL_FIRST), T.marked(T.MISTRAL_FIRST), True, False),
    "mistral_system_last_user": (T.plain(T.MISTRAL_LAST), T.marked(T.MISTRAL_LAST), False, False),
    "qwen3_reasoning": (T.plain(T.QWEN3), T.marked(T.QWEN3), False, True),
    "qwen3_no_reasoning": (T.plain(T.QWEN3), T.marked(T.QWEN3), False, False),
    "deepseek_r1": (T.plain(T.DEEPSEEK_R1), T.marked(T.DEEPSEEK_R1), False, True),
    "phi4": (T.plain(T.PHI4), T.marked(T.PHI4), True, False),
    "smollm2": (None, T.marked(T.SMOLLM2_MARKED_SOURCE), True, False),
}

WHERE = "row 0"
WORDS = "yes no positive negative hello there bye say answer the is movie review one word assistant user system model think".split()
# SmolLM2's template writes the last one as its default system prompt.
PHRASES = [
    "Answer yes or no.",
    "Is this movie review positive or negative? Answer with one word.",
    "hello there",
    "say yes",
    "yes",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
]
SHORT = ["assistant", "user", "system", "model", "yes", "no", "positive", "negative", "bye"]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_smollm2())


class Pairs(dict):
    def __repr__(self):  # hypothesis prints the test's arguments
        return "tokenizers"


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    """name -> (tokenizer with the plain template, tokenizer with the {% generation %} one)."""
    pairs = Pairs()
    for name, (template, generation, _, _) in TEMPLATES.items():
        plain, marked = copy.deepcopy(smollm2), copy.deepcopy(smollm2)
        if template is not None:
            plain.chat_template = template
        marked.chat_template = generation
        pairs[name] = (plain, marked)
    return pairs


# ---------------------------------------------------------------------------------------------------
# Conversations


text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
lines = st.lists(text, min_size=2, max_size=3).map("\n".join)
blank = st.sampled_from(["", " ", "\n", " \n "])
pad = st.sampled_from(["", " ", "\n", "  ", "\n\n", " \n"])


@st.composite
def conversations(draw, reasoning: bool):
    """An optional system prompt and 1-4 user/assistant exchanges. Answers are drawn from the words
    of the other messages, or repeat one of them exactly (the system prompt, the question, an earlier
    answer), or are role names, single words, several lines, padded with spaces and newlines, or
    blank; users quote earlier answers; a few conversations end with a question. With ``reasoning``,
    answers may start with a <think> block."""
    messages = []
    system = draw(st.none() | st.sampled_from(PHRASES) | text)
    if system is not None:
        messages.append({"role": "system", "content": system})
    answers: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        users = [text, lines, st.sampled_from(PHRASES)]
        if answers:
            said = st.sampled_from(answers)
            users += [said, st.tuples(said, text).map(lambda t: f"{t[0].strip()}, now say {t[1]}"), st.tuples(text, said).map(lambda t: f'{t[0]} "{t[1]}"')]
        user = draw(st.one_of(users))
        before = [m["content"] for m in messages] + [user]
        options = [text, lines, st.sampled_from(SHORT), st.sampled_from(before), st.tuples(pad, text | lines | st.sampled_from(SHORT), pad).map("".join), blank]
        if user.split():
            options.append(st.sampled_from(user.split()))
        answer = draw(st.one_of(options))
        if reasoning and draw(st.booleans()):
            thought = draw(text | lines | st.sampled_from(before + [answer]))
            answer = f"<think>\n{thought}\n</think>\n\n{answer}"
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        answers.append(answer)
    if draw(st.integers(0, 9)) == 0:  # now and then a last question without its answer
        messages.append({"role": "user", "content": draw(text | st.sampled_from(answers))})
    return messages


# ---------------------------------------------------------------------------------------------------
# References


def trained(messages) -> list[int]:
    return [k for k, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]


def prefix_spans(messages, tokenizer, text) -> dict[int, tuple[int, int]]:
    """Reference (a): message k's span from prefix renders, for the turns where they are prefixes of
    the whole rendering (from the generation prompt's end to the end of messages[:k + 1], or of the
    text for the last message)."""
    spans = {}
    for k in trained(messages):
        head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        tail = text if k == len(messages) - 1 else tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if text.startswith(head) and text.startswith(tail):
            spans[k] = (len(head), len(tail))
    return spans


def generation_spans(messages, marked) -> tuple[str, list[tuple[int, int]]]:
    """Reference (b), in characters: the {% generation %} blocks of the marked template."""
    texts, indices = render_jinja_template(
        conversations=[messages], chat_template=marked.chat_template, return_assistant_tokens_mask=True, **marked.special_tokens_map
    )
    return texts[0], [tuple(span) for span in indices[0]]


def overlapping(tokenizer, text, spans) -> list[int]:
    """Labels of the tokens of ``text`` whose characters overlap a span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i if any(max(a, s) < min(b, e) for s, e in spans) else IGNORE for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])]


def pieces(text, spans) -> list[str]:
    return [text[s:e] for s, e in spans]


@pytest.mark.parametrize("name", list(TEMPLATES))
@settings(max_examples=500, deadline=None, derandomize=True)
@given(data=st.data())
def test_labels_match_prefix_renders_and_generation_mask(name, tokenizers, data):
    _, _, prefix_stable, reasoning = TEMPLATES[name]
    plain, marked = tokenizers[name]
    messages = data.draw(conversations(reasoning), label="messages")
    full = plain.apply_chat_template(messages, tokenize=False)
    ks = trained(messages)
    if not ks:
        with pytest.raises(DataError):
            render(messages, plain, WHERE)
        return

    text, spans = render(messages, plain, WHERE)
    assert text == full
    assert len(spans) == len(ks), f"one span per trained turn {ks}, got {spans}"

    # (a) prefix renders: every turn of a prefix-stable template, the last turn of every template.
    reference = prefix_spans(messages, plain, text)
    if ks[-1] == len(messages) - 1:
        assert ks[-1] in reference, "the last message's generation prompt is a prefix of the rendering"
    if prefix_stable:
        assert sorted(reference) == ks
    for i, k in enumerate(ks):
        if k in reference:
            assert pieces(text, [spans[i]]) == pieces(text, [reference[k]]), f"messages[{k}] vs prefix renders"
            assert spans[i] == reference[k]

    # (b) the {% generation %} copy of the template: same text, same spans in characters, ...
    marked_text, generation = generation_spans(messages, marked)
    assert marked_text == text
    assert pieces(text, spans) == pieces(text, generation), "labelled text vs {% generation %} blocks"
    assert spans == generation
    # ... and in tokens, against the tokenizer's own mask.
    encoded = marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    got = encode_conversation(messages, plain, WHERE)
    assert got["input_ids"] == ids
    assert got["labels"] == [i if m else IGNORE for i, m in zip(ids, mask)]

    # The labelled tokens are exactly those overlapping the spans; mask_history keeps the last span's.
    assert got["labels"] == overlapping(plain, text, spans)
    last = encode_conversation(messages, plain, WHERE, mask_history=True)
    assert last["input_ids"] == ids
    assert last["labels"] == overlapping(plain, text, spans[-1:])


@pytest.mark.parametrize("name", list(TEMPLATES))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_rows_rendered_together_are_located_as_alone(name, tokenizers, data):
    """The pipeline renders many rows (and their prefixes) in one call: rows with and without a
    system prompt, or with and without reasoning, must not leak into each other."""
    plain, _ = tokenizers[name]
    rows = data.draw(st.lists(conversations(TEMPLATES[name][3]), min_size=2, max_size=4), label="rows")
    results = render_conversations(rows, Renderer(plain), [f"row {i}" for i in range(len(rows))])
    assert len(results) == len(rows)
    for i, (messages, result) in enumerate(zip(rows, results)):
        if not trained(messages):
            assert isinstance(result, DataError)
            continue
        text, spans = render(messages, plain, f"row {i}")
        assert text == plain.apply_chat_template(messages, tokenize=False)
        assert (result.text, result.spans) == (text, spans), f"row {i}"


# ---------------------------------------------------------------------------------------------------
# Named cases on SmolLM2's own template (ChatML with a default system prompt); the expected text and
# spans are put together here segment by segment.

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chatml(messages):
    """The ChatML text of ``messages`` and the span of each assistant answer (content + <|im_end|>\\n)."""
    text = SMOL_SYSTEM if messages[0]["role"] != "system" else ""
    spans = []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len("<|im_end|>\n")))
        text += m["content"] + "<|im_end|>\n"
    return text, spans


def labelled_text(encoded, tokenizer) -> str:
    return tokenizer.decode([t for t in encoded["labels"] if t != IGNORE])


def check_chatml(messages, tokenizer):
    """render() gives the ChatML text and answer spans; encode_conversation labels their tokens."""
    expected_text, expected_spans = chatml(messages)
    text, spans = render(messages, tokenizer, WHERE)
    assert text == expected_text
    assert pieces(text, spans) == pieces(text, expected_spans)
    assert spans == expected_spans
    assert encode_conversation(messages, tokenizer, WHERE)["labels"] == overlapping(tokenizer, text, expected_spans)
    return text, spans


REVIEW = (
    "Review: I hoped for a positive evening and got a negative one, then a positive ending.\nIs this movie review positive or negative? Answer with one word."
)


@pytest.mark.parametrize("answer", ["positive", "negative"])
def test_demo_row_labels_the_answer_not_the_question(smollm2, answer):
    messages = [{"role": "user", "content": REVIEW}, {"role": "assistant", "content": answer}]
    check_chatml(messages, smollm2)
    encoded = encode_conversation(messages, smollm2, WHERE)
    assert labelled_text(encoded, smollm2) == f"{answer}<|im_end|>\n"
    n = sum(t != IGNORE for t in encoded["labels"])
    assert encoded["labels"][-n:] == encoded["input_ids"][-n:]  # the last tokens: the answer's


def test_answer_that_occurs_in_the_system_prompt(smollm2):
    messages = [
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": "Is the sky blue? yes or no"},
        {"role": "assistant", "content": "yes"},
    ]
    text, spans = check_chatml(messages, smollm2)
    assert spans == [(len(text) - len("yes<|im_end|>\n"), len(text))]
    assert labelled_text(encode_conversation(messages, smollm2, WHERE), smollm2) == "yes<|im_end|>\n"


def test_equal_answers_are_each_labelled_at_their_own_turn(smollm2):
    messages = [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Again, yes or no?"},
        {"role": "assistant", "content": "yes"},
    ]
    check_chatml(messages, smollm2)
    assert labelled_text(encode_conversation(messages, smollm2, WHERE), smollm2) == "yes<|im_end|>\nyes<|im_end|>\n"


def test_user_quoting_an_earlier_answer(smollm2):
    messages = [
        {"role": "user", "content": "Greet me."},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "hello there, now say bye"},
        {"role": "assistant", "content": "bye"},
    ]
    text, spans = check_chatml(messages, smollm2)
    assert pieces(text, spans) == ["hello there<|im_end|>\n", "bye<|im_end|>\n"]
    assert labelled_text(encode_conversation(messages, smollm2, WHERE), smollm2) == "hello there<|im_end|>\nbye<|im_end|>\n"


def test_mask_history_labels_only_the_last_turn_at_its_place(smollm2):
    messages = [
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": "yes?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "yes or no, again"},
        {"role": "assistant", "content": "yes"},
    ]
    text, spans = check_chatml(messages, smollm2)
    encoded = encode_conversation(messages, smollm2, WHERE, mask_history=True)
    assert labelled_text(encoded, smollm2) == "yes<|im_end|>\n"
    assert encoded["labels"] == overlapping(smollm2, text, spans[-1:])
    n = sum(t != IGNORE for t in encoded["labels"])
    assert encoded["labels"][-n:] == encoded["input_ids"][-n:]


def test_qwen3_last_turn_labels_its_reasoning(tokenizers):
    plain, _ = tokenizers["qwen3_reasoning"]
    messages = [
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": "Is it yes?"},
        {"role": "assistant", "content": "<think>\nyes or no\n</think>\n\nyes"},
        {"role": "user", "content": "think again: yes?"},
        {"role": "assistant", "content": "<think>\nyes, say yes\n</think>\n\nyes"},
    ]
    text, spans = render(messages, plain, WHERE)
    assert text == (
        "<|im_start|>system\nAnswer yes or no.<|im_end|>\n<|im_start|>user\nIs it yes?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n<|im_start|>user\nthink again: yes?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nyes, say yes\n</think>\n\nyes<|im_end|>\n"
    )
    first = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    last = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert spans == [(first, first + len("yes<|im_end|>\n")), (last, len(text))]
    assert pieces(text, spans) == ["yes<|im_end|>\n", "<think>\nyes, say yes\n</think>\n\nyes<|im_end|>\n"]
    encoded = encode_conversation(messages, plain, WHERE)
    assert labelled_text(encoded, plain) == "yes<|im_end|>\n<think>\nyes, say yes\n</think>\n\nyes<|im_end|>\n"


def test_every_demo_row_labels_its_answer_and_the_end_of_turn(smollm2, tmp_path):
    """All 1,000 rows of `make demo` (examples/demo.py), through the pipeline as sora-train reads them."""
    import importlib.util
    import json
    from pathlib import Path

    from sora_dist.data import tokenize_file

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = [row for part in demo.demo_rows().values() for row in part]
    path = tmp_path / "demo.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = tokenize_file(path, smollm2, "chat", 512)
    assert len(examples) == len(rows) == 1000
    for row, example in zip(rows, examples.rows):
        answer = row["messages"][-1]["content"]
        assert smollm2.decode([t for t in example["labels"] if t != IGNORE]) == answer + "<|im_end|>\n"
        prompt = smollm2.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert smollm2.decode(example["input_ids"][: example["prompt_length"]]) == prompt
