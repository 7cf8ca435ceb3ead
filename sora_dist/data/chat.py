"""Chat conversations: render once with the tokenizer's template, label exactly the assistant turns.

A label span belongs to the assistant message it comes from. It starts where the template starts
writing that message (after everything it wrote for the messages before it and the turn's header,
i.e. where the generation prompt ends) and covers what the template writes for that message through
its end-of-turn text. Spans are never found by searching the rendered text for the message's words
(the words of a short answer often occur earlier, in the question or the system prompt); each one is
read off renders of the same conversation (docs/method.md, "Which tokens are trained"):

1. a template with ``{% generation %}`` markers tells which tokens are the assistant's (the
   tokenizer's ``return_assistant_tokens_mask``): that mask is used as it is;
2. otherwise, for assistant message k of the full rendering T:
   - start: ``G = render(messages[:k], add_generation_prompt=True)``; when T starts with G, the
     turn starts at ``len(G)``;
   - end: the end of T for the last message; else ``E = render(messages[:k + 1])``, when T starts
     with E, the turn ends at ``len(E)``;
   - a template that renders earlier turns differently once later ones follow (Qwen3 and
     DeepSeek-R1 drop the reasoning of earlier turns; some templates move the system prompt into
     the last user turn) fails one of those prefix checks; that side of the span then comes from a
     render with message k's content replaced by a sentinel that occurs nowhere else: the
     characters before the first difference from T, and after the last, are not message k's
     content, so the content lies between them; the end-of-turn text that follows it in both
     renders is added.
   A turn that none of this locates stops the row with an error naming the message; nothing is
   labelled by guess. The tokens whose characters overlap a span are labelled (offsets of a fast
   tokenizer).

Assistant messages with neither content nor tool calls are not labelled; tool results (role
``tool``) never are. ``mask_history``: label only the last assistant turn (earlier turns are
context).
"""

from __future__ import annotations

import functools
from bisect import bisect_left, bisect_right
from os.path import commonprefix

from .formats import IGNORE, NO_LABEL, DataError

ROLES = ("system", "user", "assistant", "tool")
# Private-use characters: no tokenizer text is made of them, and the first set absent from a
# conversation stands in for one message's content.
SENTINELS = ("\ue000\ue001\ue002", "\uf8f0\uf8f1\uf8f2", "\U000f0000\U000f0001")


def check_messages(messages, where: str, need_assistant: bool = True) -> list[dict]:
    """``messages`` as a list of {role, content} dicts (keys with null values dropped, as a columnar
    reader adds them), with known roles and text content (an assistant message may carry
    ``tool_calls`` instead), or DataError. Training data (``need_assistant``) must hold an assistant
    message; a prompt need not."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        message = _without_nulls(message)
        if "role" not in message or ("content" not in message and not message.get("tool_calls")):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {message['role']!r}; expected one of {list(ROLES)}")
        message.setdefault("content", "")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be text, got {type(message['content']).__name__}")
        clean.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: no assistant message, so {NO_LABEL}")
    return clean


def _without_nulls(value):
    """Dicts without null entries, all the way down: a columnar reader (Arrow) can give every row the
    keys of all rows (a tool call's arguments too), with nulls where a row had none."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def trained_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant messages that are trained: those with content or tool calls."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls"))]


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


class Renderer:
    """The tokenizer's chat template applied to many conversations at once, as ``apply_chat_template``
    renders them (same compiled template, same environment, same special-token variables)."""

    # Rendering is most of a chat row's preparation, and jinja's per-call setup most of a render; one
    # call of a loop that includes the template renders a whole batch in about half the time. Used for
    # rows of plain JSON messages without reasoning fields (what apply_chat_template renders as is);
    # anything else goes through transformers' own function.
    SEPARATOR = "\ue0ff\ue0fe\ue0fd"
    ALIASED = ("reasoning_content", "thinking", "reasoning")  # fields transformers copies under each other's names

    def __init__(self, tokenizer):
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise DataError("the tokenizer has no chat template; use format 'instruction' or 'text'")
        self.tokenizer = tokenizer
        self.template = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else template
        self.variables = dict(tokenizer.special_tokens_map)
        self._batched = self._loop = self._chat = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

            self._batched = render_jinja_template
            self._chat = _compile_jinja_template(self.template)
            self._loop = _loop_template(self._chat.environment, self.SEPARATOR)
        except Exception:  # another transformers: its public function, one conversation at a time
            pass

    def __call__(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        if self._loop is not None and not any(field in m for c in conversations for m in c for field in self.ALIASED):
            texts = self._loop.render(conversations=conversations, chat=self._chat, add_generation_prompt=generation_prompt,
                                      **self.variables).split(self.SEPARATOR)  # fmt: skip
            if len(texts) == len(conversations) + 1:
                return texts[:-1]
        if self._batched is not None:
            texts, _ = self._batched(conversations=conversations, chat_template=self.template,
                                     add_generation_prompt=generation_prompt, **self.variables)  # fmt: skip
            return texts
        return [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt) for c in conversations]

    def one(self, messages: list[dict], generation_prompt: bool, where: str, index: int) -> str:
        """One render; a template error (e.g. roles that must alternate) names the message."""
        try:
            return self([messages], generation_prompt)[0]
        except DataError:
            raise
        except Exception as err:  # jinja raises its own errors and the template's raise_exception
            raise DataError(f"{where}: the chat template cannot render messages[:{index}]: {err}") from None


@functools.lru_cache(maxsize=8)
def _loop_template(environment, separator: str):
    """The batch loop, compiled once per jinja environment."""
    return environment.from_string("{% for messages in conversations %}{% include chat %}" + separator + "{% endfor %}")


class Conversation:
    """One conversation's rendering and the character spans of its trained assistant turns.

    ``prompt_end`` is where the last trained turn starts: the conversation up to it, with the
    generation prompt, is what a model is given to produce that turn."""

    __slots__ = ("text", "spans", "prompt_end")

    def __init__(self, text: str, spans: list[tuple[int, int]], prompt_end: int):
        self.text, self.spans, self.prompt_end = text, spans, prompt_end


def render_conversations(rows: list[list[dict]], renderer: Renderer, wheres: list[str]) -> list[Conversation | DataError]:
    """Every conversation rendered whole, and each trained assistant turn located by prefix renders
    (batched over the rows), or by the sentinel render where a prefix check fails."""
    results: list[Conversation | DataError | None] = [None] * len(rows)
    turns = [trained_turns(messages) for messages in rows]
    full = _render_each(renderer, rows, False, wheres)
    heads, tails, head_of, tail_of = [], [], {}, {}
    for r, (messages, ks) in enumerate(zip(rows, turns)):
        if isinstance(full[r], DataError):
            results[r] = full[r]
            continue
        if not ks:
            results[r] = DataError(f"{wheres[r]}: every assistant message is empty, so {NO_LABEL}")
            continue
        for k in ks:
            head_of[r, k] = len(heads)
            heads.append(messages[:k])
            if k < len(messages) - 1:
                tail_of[r, k] = len(tails)
                tails.append(messages[: k + 1])
    head_texts = _render_each(renderer, heads, True, None)
    tail_texts = _render_each(renderer, tails, False, None)
    for r, (messages, ks) in enumerate(zip(rows, turns)):
        if results[r] is not None:
            continue
        text = full[r]
        try:
            spans = []
            for k in ks:
                head = head_texts[head_of[r, k]]
                tail = tail_texts[tail_of[r, k]] if (r, k) in tail_of else text
                spans.append(_turn_span(messages, k, text, head, tail, renderer, wheres[r]))
            for (_, end), (start, _) in zip(spans, spans[1:]):
                if start < end:
                    raise DataError(f"{wheres[r]}: assistant turns overlap in the chat template's rendering; cannot label them")
            results[r] = Conversation(text, spans, spans[-1][0])
        except DataError as err:
            results[r] = err
    return results


def _render_each(renderer: Renderer, conversations: list[list[dict]], generation_prompt: bool, wheres) -> list:
    """Batched renders; when the batch fails, one by one, so that a failure belongs to its row (a
    failed prefix render is kept as the error, and its turn is located by the sentinel render)."""
    try:
        return renderer(conversations, generation_prompt)
    except Exception:
        pass
    out = []
    for i, conversation in enumerate(conversations):
        try:
            out.append(renderer([conversation], generation_prompt)[0])
        except Exception as err:
            where = wheres[i] if wheres else "chat template"
            out.append(DataError(f"{where}: the chat template cannot render this conversation: {err}"))
    return out


def _turn_span(messages: list[dict], k: int, text: str, head, tail, renderer: Renderer, where: str) -> tuple[int, int]:
    """The character span of assistant message ``k`` in ``text`` (see the module docstring)."""
    start = len(head) if isinstance(head, str) and text.startswith(head) else None
    end = len(tail) if isinstance(tail, str) and text.startswith(tail) else None
    if start is None or end is None or not start < end:
        start, end = _sentinel_span(messages, k, text, start, end, renderer, where)
    if not start < end:
        raise DataError(f"{where}: messages[{k}] (assistant) cannot be located in the chat template's rendering; cannot label it")
    if not _writes_content(messages[k]["content"], text[start:end]):
        raise DataError(f"{where}: messages[{k}] (assistant): the chat template does not write its content in its turn; cannot label it")
    return start, end


def _writes_content(content: str, turn: str) -> bool:
    """A check, after the span is located: the turn holds the message's answer (templates may trim
    it, and drop a reasoning block before it)."""
    answer = content.strip()
    if answer in turn:
        return True
    answer = content.rpartition("</think>")[2].strip()
    return not answer or answer in turn


def _sentinel_span(messages, k, text, start, end, renderer: Renderer, where: str) -> tuple[int, int]:
    """Locate message ``k`` by rendering the conversation with its content replaced by a sentinel:
    the characters before the first difference from ``text`` and after the last one are not
    message k's content, so the content lies between them."""
    cannot = f"{where}: messages[{k}] (assistant) cannot be located in the chat template's rendering; cannot label it"
    sentinel = next((s for s in SENTINELS if not any(c in text for c in s)), None)
    if sentinel is None:
        raise DataError(f"{where}: messages[{k}] (assistant) cannot be located: the conversation uses private-use characters")
    marked = [dict(m, content=sentinel) if i == k else m for i, m in enumerate(messages)]
    other = renderer.one(marked, False, where, len(marked))
    if other.count(sentinel) != 1:
        raise DataError(f"{where}: messages[{k}] (assistant): the chat template does not write its content once; cannot label it")
    at = other.index(sentinel)
    after = at + len(sentinel)
    same_head = len(commonprefix([text, other]))  # <= at: the sentinel's characters are not in text
    same_tail = len(commonprefix([text[::-1], other[::-1]]))  # <= len(other) - after, likewise
    as_last = _try_render(renderer, marked[: k + 1], False)
    if start is None:
        # What the template writes for the turn between its header and its content (a space, an
        # empty reasoning block) belongs to the turn, when it is there, unchanged, right before it.
        start = same_head
        for lead in (_lead(_try_render(renderer, marked[:k], True), as_last, sentinel), renderer_lead(renderer)):
            if lead and at - len(lead) <= same_head and other[at - len(lead) : at] == lead:
                start = at - len(lead)
                break
    if end is None:
        # The end-of-turn text: what follows the content here and also when the turn is the last one.
        if same_tail != len(other) - after or as_last is None or as_last.count(sentinel) != 1:
            raise DataError(cannot)
        closing = commonprefix([other[after:], as_last[as_last.index(sentinel) + len(sentinel) :]])
        end = len(text) - same_tail + len(closing)
    return start, end


def _try_render(renderer: Renderer, messages: list[dict], generation_prompt: bool) -> str | None:
    try:
        return renderer([messages], generation_prompt)[0]
    except Exception:  # a template that cannot render this prefix: that reference is not available
        return None


def _lead(head: str | None, as_last: str | None, sentinel: str) -> str | None:
    """The text between the generation prompt and the content of a turn rendered last."""
    if head is None or as_last is None or not as_last.startswith(head) or as_last.count(sentinel) != 1:
        return None
    return as_last[len(head) : as_last.index(sentinel)]


def renderer_lead(renderer: Renderer) -> str | None:
    """The template's text between the generation prompt and an answer, from a one-exchange probe."""
    if not hasattr(renderer, "_lead"):
        sentinel = SENTINELS[0]
        probe = [{"role": "user", "content": "hello"}]
        renderer._lead = _lead(_try_render(renderer, probe, True), _try_render(renderer, probe + [{"role": "assistant", "content": sentinel}], False), sentinel)
    return renderer._lead


def render(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation rendered by the template, and the character spans of its trained assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the tokenizer has no chat template; use format 'instruction' or 'text'")
    result = render_conversations([check_messages(messages, where)], Renderer(tokenizer), [where])[0]
    if isinstance(result, DataError):
        raise result
    return result.text, result.spans


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], mask_history: bool) -> list[int]:
    """Labels: the tokens whose characters overlap a span keep their id, the rest IGNORE."""
    labels = [IGNORE] * len(ids)
    for start, end in spans[-1:] if mask_history else spans:
        first = bisect_right(offsets, start, key=_end)  # the first token ending after the span starts
        stop = bisect_left(offsets, end, key=_start)  # the first token starting at or after its end
        labels[first:stop] = ids[first:stop]
    return labels


def tokens_before(offsets: list[tuple[int, int]], position: int) -> int:
    """How many tokens end at or before character ``position``."""
    return bisect_right(offsets, position, key=_end)


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


def encode_conversation(messages: list[dict], tokenizer, where: str, mask_history: bool = False) -> dict:
    """input_ids of the whole rendered conversation, labels on the trained assistant turns only, and
    ``prompt_length``: the tokens before the last trained turn."""
    messages = check_messages(messages, where)
    if has_generation_markers(tokenizer):
        return encode_with_generation_markers(messages, tokenizer, where, mask_history)
    text, spans = render(messages, tokenizer, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    return {"input_ids": ids, "labels": label_tokens(ids, offsets, spans, mask_history), "prompt_length": tokens_before(offsets, spans[-1][0])}


def encode_with_generation_markers(messages: list[dict], tokenizer, where: str, mask_history: bool) -> dict:
    """The tokenizer's own assistant mask (``{% generation %}`` templates)."""
    try:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except Exception as err:
        raise DataError(f"{where}: the chat template cannot render this conversation: {err}") from None
    ids, turns = list(encoded["input_ids"]), _runs(list(encoded["assistant_masks"]))
    if not turns:
        raise DataError(f"{where}: the chat template marks no assistant token, so {NO_LABEL}")
    labels = [IGNORE] * len(ids)
    for turn in turns[-1:] if mask_history else turns:
        for t in turn:
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels, "prompt_length": turns[-1][0]}


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
