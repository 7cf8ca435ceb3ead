"""Chat conversations: render once with the tokenizer's template, label exactly the assistant turns.

The loss goes on each assistant turn as it appears in the rendering of the WHOLE conversation:
its content and the template's end-of-turn text (e.g. ``<|im_end|>``), nothing the user, the
system or the template's role headers wrote. Templates that render earlier turns differently once
later turns follow (Qwen3 and DeepSeek-R1 drop the reasoning of assistant turns before the last
user message) are handled, because nothing is rendered prefix by prefix:

1. a template with ``{% generation %}`` markers tells which tokens are the assistant's (the
   tokenizer's ``return_assistant_tokens_mask``): that mask is used as it is;
2. otherwise each assistant content is found in the rendered text, in order, and the template's
   end-of-turn text after it is added (learned once per template from a probe conversation);
   the tokens whose characters overlap those spans are labelled (offsets of a fast tokenizer).

``mask_history``: label only the last assistant turn (earlier turns are context).
"""

from __future__ import annotations

import re

from .formats import IGNORE, DataError

ROLES = ("system", "user", "assistant", "tool")
THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)
_PROBE_USER, _PROBE_ASSISTANT = "PROBEUSERTEXT", "PROBEASSISTANTTEXT"


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` as a list of {role, content} with text content and known roles, or DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {message['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be text, got {type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    return messages


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def end_of_turn(tokenizer) -> str:
    """What the template writes right after an assistant message's content (e.g. ``<|im_end|>\\n``),
    learned once per tokenizer from a probe conversation."""
    cached = getattr(tokenizer, "_sora_end_of_turn", None)
    if cached is not None:
        return cached
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.rindex(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT) :] if _PROBE_ASSISTANT in text else ""
    tokenizer._sora_end_of_turn = after
    return after


def assistant_spans(text: str, messages: list[dict], closing: str, where: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn in the rendered ``text`` (content + end-of-turn)."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        candidates = [content, content.strip(), THINK.sub("", content).strip()]
        start = -1
        for candidate in (c for c in candidates if c):
            start = text.find(candidate, cursor)
            if start >= 0:
                end = start + len(candidate)
                break
        if start < 0:
            if not content.strip():
                continue  # an empty answer: nothing of it to find (its end-of-turn is not labelled)
            raise DataError(f"{where}: messages[{i}] (assistant) does not appear in the chat template's rendering; cannot label it")
        for tail in (closing, closing.rstrip()):
            if tail and text.startswith(tail, end):
                end += len(tail)
                break
        spans.append((start, end))
        cursor = end
    return spans


def render(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation rendered by the template, and the character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the tokenizer has no chat template; use format 'instruction' or 'text'")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text, assistant_spans(text, messages, end_of_turn(tokenizer), where)


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], mask_history: bool) -> list[int]:
    """Labels: the tokens whose characters overlap an assistant span keep their id, the rest IGNORE."""
    labels = [IGNORE] * len(ids)
    for start, end in spans[-1:] if mask_history else spans:
        for t, (a, b) in enumerate(offsets):
            if b > start and a < end and b > a:
                labels[t] = ids[t]
    return labels


def encode_conversation(messages: list[dict], tokenizer, where: str, mask_history: bool = False) -> dict:
    """input_ids of the whole rendered conversation and labels on the assistant turns only."""
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, turns = list(encoded["input_ids"]), _runs(list(encoded["assistant_masks"]))
        labels = [IGNORE] * len(ids)
        for turn in turns[-1:] if mask_history else turns:
            for t in turn:
                labels[t] = ids[t]
        return {"input_ids": ids, "labels": labels}
    text, spans = render(messages, tokenizer, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    return {"input_ids": ids, "labels": label_tokens(ids, encoded["offset_mapping"], spans, mask_history)}


def _runs(mask: list[int]) -> list[list[int]]:
    """Consecutive positions where ``mask`` is 1, one list per run (one per assistant turn)."""
    runs, current = [], []
    for t, flag in enumerate(mask):
        if flag:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
