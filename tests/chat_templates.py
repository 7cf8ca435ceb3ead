"""Chat templates of several model families, written out for the chat-masking tests
(tests/test_data_chat_templates.py). Each reproduces what the family's template renders for system /
user / assistant messages without tools, with the family's markers as literal text.

In each template, « and » enclose what the template writes for an assistant message after its header,
through its end-of-turn text: ``plain(t)`` drops them (the template as the family ships it);
``marked(t)`` turns them into ``{% generation %}`` ... ``{% endgeneration %}`` for assistant messages
with non-blank content (those are the trained turns), so the tokenizer's own assistant mask is an
independent reference for the labels.
"""

from __future__ import annotations

import re

# Llama 3: every message is a header, its content trimmed, <|eot_id|>.
LLAMA3 = """
{{- '<|begin_of_text|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        «{{- message['content'] | trim + '<|eot_id|>' }}»
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Gemma 3: no system role; the system prompt opens the first user turn; the assistant is "model".
GEMMA3 = """
{{- '<bos>' }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}«{{- message['content'] | trim + '<end_of_turn>\n' }}»
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + (first_user_prefix if loop.first else '') }}
        {{- message['content'] | trim + '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

# Mistral, [INST] format, system prompt opening the first user message. "[/INST]" is the generation
# prompt, so add_generation_prompt adds nothing (as in Mistral's own templates).
MISTRAL_FIRST = """
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<s>' }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        «{{- ' ' + message['content'] + '</s>' }}»
    {%- endif %}
{%- endfor %}
"""

# Mistral v0.3 style: the system prompt opens the LAST user message, so a prefix of the conversation
# renders its earlier turns differently from the whole conversation (not prefix-stable).
MISTRAL_LAST = """
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- '<s>' }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.index0 == ns.last_user and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        «{{- ' ' + message['content'] | trim + '</s>' }}»
    {%- endif %}
{%- endfor %}
"""

# Qwen3: the reasoning (<think>...</think> at the start of an assistant content) is shown only for the
# assistant turns after the last user query; the last message always gets a (possibly empty) block.
QWEN3 = """
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' }}«
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}»
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# DeepSeek-R1 style: system prompts first, then <｜User｜> / <｜Assistant｜> turns; an assistant turn
# followed by a later user message loses everything through its </think>.
DEEPSEEK_R1 = """
{%- set ns = namespace(system_prompt='', is_first_sp=true, last_user=-1) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.is_first_sp %}
            {%- set ns.system_prompt = ns.system_prompt + message['content'] %}
            {%- set ns.is_first_sp = false %}
        {%- else %}
            {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}
        {%- endif %}
    {%- elif message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- '<｜begin▁of▁sentence｜>' + ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if loop.index0 < ns.last_user and '</think>' in content %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<｜Assistant｜>' }}«{{- content + '<｜end▁of▁sentence｜>' }}»
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
{%- endif %}
"""

# Phi-4: ChatML with <|im_sep|> after the role and no newlines.
PHI4 = """
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- '<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant<|im_sep|>' }}«{{- message['content'] + '<|im_end|>' }}»
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_sep|>' }}
{%- endif %}
"""

# SmolLM2's ChatML (a default system prompt when there is none), with the assistant part marked; the
# tests use the tokenizer's own template as the plain one and check that this renders the same text.
SMOLLM2_MARKED_SOURCE = """
{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}«{{- message['content'] + '<|im_end|>\n' }}»
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_ASSISTANT = re.compile("«(.*?)»", re.DOTALL)


def plain(template: str) -> str:
    return template.replace("«", "").replace("»", "")


def marked(template: str) -> str:
    def wrap(match: re.Match) -> str:
        body = match.group(1)
        return "{%- if message['content'].strip() %}{%- generation %}" + body + "{%- endgeneration %}{%- else %}" + body + "{%- endif %}"

    out = _ASSISTANT.sub(wrap, template)
    assert "«" not in out and "»" not in out
    return out
