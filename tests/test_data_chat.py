"""Chat masking follows the template (sora_dist.data.chat): the labels are exactly the assistant turns
as they appear in the rendering of the whole conversation, also for a Qwen3-style template (earlier
turns lose their reasoning once a later user turn follows) and for a ``{% generation %}`` template;
``mask_history`` keeps only the last turn; ShareGPT rows train like OpenAI messages; an assistant's tool
calls are trained and tool results are not; empty answers are not trained; a turn that cannot be
located stops the row naming the message. Each expectation is built independently, segment by
segment, from the text the template is known to produce. tests/test_data_chat_templates.py checks
many templates on randomized conversations against two other references."""

from __future__ import annotations

import json

import pytest
from helpers import require_smollm2, word_tokenizer

from sora_dist.data import IGNORE, DataError, tokenize_file

MARKERS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = "user assistant system hello there how are you fine thanks bye goodbye say what is two plus one three".split()

# Qwen3's rule, written out: an assistant turn's reasoning (<think>...</think>) is rendered only for
# turns after the last user message; earlier turns show their final answer alone.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set content = content.split('</think>')[-1].strip() -%}"
    "{%- endif -%}"
    "<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_user and reasoning %}<think> {{ reasoning }} </think> {% endif %}{{ content }}<|im_end|>\n"
    "{%- else -%}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
GENERATION_MARKED = (
    "{%- for m in messages -%}"
    "<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' %}{% generation %} {{ m.content }}<|im_end|>{% endgeneration %}\n"
    "{%- else %} {{ m.content }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
)
CONVERSATION = [
    {"role": "system", "content": "say hello"},
    {"role": "user", "content": "what is two plus one"},
    {"role": "assistant", "content": "<think> two plus one is three </think> three"},
    {"role": "user", "content": "thanks bye"},
    {"role": "assistant", "content": "<think> say bye </think> goodbye"},
]


def tokenizer_with(template: str):
    tokenizer = word_tokenizer(MARKERS + WORDS, chat_template=template)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    return tokenizer


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """ids and labels from text segments (text, trained?) tokenized one by one."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def encode(tmp_path, tokenizer, rows, **kwargs) -> list[dict]:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tokenize_file(path, tokenizer, "chat", 256, **kwargs).rows


def test_qwen3_style_template_labels_the_turns_as_the_full_rendering_shows_them(tmp_path):
    tokenizer = tokenizer_with(QWEN3_STYLE)
    # The first answer's reasoning is gone from the full rendering (a user turn follows it); the last keeps it.
    want_ids, want_labels = expected(tokenizer, [
        ("<|im_start|>system\nsay hello<|im_end|>\n<|im_start|>user\nwhat is two plus one<|im_end|>\n<|im_start|>assistant\n", False),
        ("three<|im_end|>\n", True),
        ("<|im_start|>user\nthanks bye<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think> say bye </think> goodbye<|im_end|>\n", True),
    ])  # fmt: skip
    example = encode(tmp_path, tokenizer, [{"messages": CONVERSATION}])[0]
    assert example["input_ids"] == want_ids and example["labels"] == want_labels
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False).count("<think>") == 1


def test_mask_history_trains_on_the_last_turn_only(tmp_path):
    tokenizer = tokenizer_with(QWEN3_STYLE)
    example = encode(tmp_path, tokenizer, [{"messages": CONVERSATION}], mask_history=True)[0]
    labelled = tokenizer.convert_ids_to_tokens([t for t in example["labels"] if t != IGNORE])
    assert labelled == ["<think>", "say", "bye", "</think>", "goodbye", "<|im_end|>"]


def test_generation_markers_give_the_assistant_mask(tmp_path):
    tokenizer = tokenizer_with(GENERATION_MARKED)
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}]  # fmt: skip
    want_ids, want_labels = expected(tokenizer, [
        ("<|im_start|>user\n hello there<|im_end|>\n<|im_start|>assistant\n", False),
        (" fine thanks<|im_end|>", True),
        ("\n<|im_start|>user\n bye<|im_end|>\n<|im_start|>assistant\n", False),
        (" goodbye<|im_end|>", True),
    ])  # fmt: skip
    example = encode(tmp_path, tokenizer, [{"messages": messages}])[0]
    assert example["input_ids"] == want_ids and example["labels"] == want_labels


def test_sharegpt_conversations_train_like_messages(tmp_path):
    tokenizer = tokenizer_with(QWEN3_STYLE)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": roles[m["role"]], "value": m["content"]} for m in CONVERSATION]
    as_messages = encode(tmp_path, tokenizer, [{"messages": CONVERSATION}])[0]
    as_sharegpt = encode(tmp_path, tokenizer, [{"conversations": sharegpt}])[0]
    assert as_sharegpt == as_messages


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hi"}]}, r"chat\.jsonl:row 1: messages\[0\]\.role is 'robot'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "hi"}]}, r"row 1: messages\[0\]\.content must be text"),
        ({"conversations": [{"from": "alien", "value": "hi"}]}, r"row 1: conversations\[0\]\.from is 'alien'"),
        ({"messages": [{"role": "user", "content": "hello"}]}, "row 1: no assistant message"),
    ],
)
def test_malformed_conversations_name_the_row(row, message, tmp_path):
    with pytest.raises(DataError, match=message):
        encode(tmp_path, tokenizer_with(QWEN3_STYLE), [row])


@pytest.mark.slow
def test_smollm2_template_labels_equal_the_prefix_difference(tmp_path):
    """On a template that renders prefix by prefix (SmolLM2's ChatML) the labels equal the tokens each
    assistant turn adds to the rendering of what precedes it with the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(require_smollm2())
    messages = [m for m in CONVERSATION if m["role"] != "system"]

    def rendered(upto: int, prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = rendered(len(messages), False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(rendered(i, True)), len(rendered(i + 1, False))
            labels[start:end] = ids[start:end]
    example = encode(tmp_path, tokenizer, [{"messages": messages}])[0]
    assert example["input_ids"] == ids
    assert example["labels"] == labels


# ChatML with tool calls: an assistant turn writes its calls after its content; tool results are
# their own turns.
TOOL_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for call in m.tool_calls %} call {{ call.function.name }} {{ call.function.arguments }}{% endfor %}{% endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def test_tool_calls_are_trained_and_tool_results_are_not(tmp_path):
    tokenizer = tokenizer_with(TOOL_TEMPLATE)
    tokenizer.add_tokens(["call", "add", "three", "two"])
    messages = [
        {"role": "user", "content": "what is two plus one"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "two"}}]},
        {"role": "tool", "content": "three"},
        {"role": "assistant", "content": "three"},
    ]
    want_ids, want_labels = expected(tokenizer, [
        ("<|im_start|>user\nwhat is two plus one<|im_end|>\n<|im_start|>assistant\n", False),
        (" call add two<|im_end|>\n", True),
        ("<|im_start|>tool\nthree<|im_end|>\n<|im_start|>assistant\n", False),
        ("three<|im_end|>\n", True),
    ])  # fmt: skip
    example = encode(tmp_path, tokenizer, [{"messages": messages}])[0]
    assert example["input_ids"] == want_ids and example["labels"] == want_labels


def test_empty_answers_are_not_trained_and_a_row_of_them_has_no_label(tmp_path):
    tokenizer = tokenizer_with(QWEN3_STYLE)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"}]  # fmt: skip
    example = encode(tmp_path, tokenizer, [{"messages": messages}])[0]
    labelled = tokenizer.convert_ids_to_tokens([t for t in example["labels"] if t != IGNORE])
    assert labelled == ["fine", "thanks", "<|im_end|>"]
    empty = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " \n"}]
    with pytest.raises(DataError, match=r"row 1: every assistant message is empty, so nothing to learn"):
        encode(tmp_path, tokenizer, [{"messages": empty}])
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (messages, empty)))
    kept = tokenize_file(path, tokenizer, "chat", 256, on_error="skip")
    assert len(kept) == 1 and kept.stats["no_label"] == 1


def test_the_prompt_is_the_conversation_up_to_the_last_turn_with_the_generation_prompt(tmp_path):
    """What generated-answer evaluation gives the model: apply_chat_template(messages[:-1],
    add_generation_prompt=True), whatever the labels say."""
    tokenizer = tokenizer_with(QWEN3_STYLE)
    for history in (False, True):
        example = encode(tmp_path, tokenizer, [{"messages": CONVERSATION}], mask_history=history)[0]
        prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
        assert example["input_ids"][: example["prompt_length"]] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


# A template that never writes the assistant's words (a broken or unsupported one): nothing to anchor to.
DROPS_ANSWERS = (
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' %}{{ m.content }}{% endif %}<|im_end|>\n{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
# A template that moves the system prompt into the last user turn, so earlier prefixes render differently.
SYSTEM_IN_LAST_USER = (
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- set rest = messages[1:] if messages[0].role == 'system' else messages -%}"
    "{%- set ns = namespace(last=-1) -%}{%- for m in rest %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in rest -%}"
    "{%- if m.role == 'user' -%}[INST] {% if loop.index0 == ns.last and sys %}{{ sys }} {% endif %}{{ m.content }} [/INST]"
    "{%- else %} {{ m.content }}</s>{% endif -%}"
    "{%- endfor -%}"
)


def test_a_turn_that_cannot_be_located_stops_the_row_naming_the_message(tmp_path):
    tokenizer = tokenizer_with(DROPS_ANSWERS)
    with pytest.raises(DataError, match=r"chat\.jsonl:row 1: messages\[1\] \(assistant\)"):
        encode(tmp_path, tokenizer, [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]}])


def test_a_template_that_rewrites_earlier_prefixes_labels_each_turn_where_it_is(tmp_path):
    """The earlier answer repeats the system prompt's word and the later user quotes it."""
    tokenizer = tokenizer_with(SYSTEM_IN_LAST_USER)
    tokenizer.add_tokens(["[INST]", "[/INST]"])
    messages = [{"role": "system", "content": "say hello"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "hello bye"},
                {"role": "assistant", "content": "bye"}]  # fmt: skip
    want_ids, want_labels = expected(tokenizer, [
        ("[INST] hello [/INST]", False), (" hello</s>", True), ("[INST] say hello hello bye [/INST]", False), (" bye</s>", True),
    ])  # fmt: skip
    example = encode(tmp_path, tokenizer, [{"messages": messages}])[0]
    assert example["input_ids"] == want_ids and example["labels"] == want_labels


def test_tool_call_arguments_read_from_a_file_keep_only_their_own_keys(tmp_path):
    """A columnar reader can give every row's arguments the keys of all rows (null where absent); the template sees
    each call's own arguments."""
    template = TOOL_TEMPLATE.replace("{{ call.function.arguments }}", "{{ call.function.arguments | tojson }}")
    tokenizer = tokenizer_with(template)

    def chat(arguments):
        return {"messages": [{"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": arguments}}]}]}  # fmt: skip

    rows = [chat({"a": "two"}), chat({"b": "three"})]
    examples = encode(tmp_path, tokenizer, rows)
    for row, example in zip(rows, examples):
        want = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert example["input_ids"] == tokenizer(want, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_without_a_chat_template_names_the_row_and_says_what_to_use(tmp_path):
    tokenizer = word_tokenizer(MARKERS + WORDS)
    rows = [{"messages": [{"role": "robot", "content": "hi"}]}, {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(DataError, match=r"row 1: messages\[0\]\.role is 'robot'"):
        encode(tmp_path, tokenizer, rows)
    with pytest.raises(DataError, match=r"chat\.jsonl:row 1: the tokenizer has no chat template; use format 'instruction' or 'text'"):
        encode(tmp_path, tokenizer, rows[1:])
