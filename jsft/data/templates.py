"""Chat templates and the `messages` format: the built-in templates, `resolve_template` for the
`data.chat_template` setting, and the checks that turn a row's messages and tools into what templates expect.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

from jsft.errors import BadRow, JsftError, SetupError, one_line

ROLES = ("system", "user", "assistant", "tool")

# The "tulu" template exactly as published (open-instruct CHAT_TEMPLATES["tulu"], used for Tulu 3 and
# OLMo 2): <|system|>\n{c}\n, <|user|>\n{c}\n, <|assistant|>\n{c}{eos} plus \n unless it is the last
# message; the generation prompt is <|assistant|>\n.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"tulu": TULU_TEMPLATE, "chatml": CHATML_TEMPLATE}


@functools.lru_cache(maxsize=64)
def resolve_template(name_or_path: str | None) -> str | None:
    """None/"" -> the tokenizer's own template; a built-in name; a Jinja file path; or Jinja text."""
    if not name_or_path:
        return None
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(
                f"chat template file {name_or_path}: cannot read it: {one_line(e, with_type=True)}"
            ) from None
    if "{%" in name_or_path or "{{" in name_or_path:
        return name_or_path
    raise JsftError(
        f"chat template {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
    )


def _text_of(content: object, where: str) -> str | None:
    """Content as a string: a string, None, or a list of text parts ({"type": "text", "text": ...})."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif (
                isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRow("non_text_content", f"{where} has a content part of type {kind!r}")
        return "".join(texts)
    raise BadRow("non_string_content", f"{where} content is {type(content).__name__}")


def _tool_calls(calls: object, where: str) -> list[dict]:
    """Tool calls as templates expect them: arguments given as a JSON object string become a dict."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise BadRow("bad_tool_calls", f"{where} tool_calls must be a list of objects")
    out = []
    for call in calls:
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRow("bad_tool_calls", f"{where} has a tool call without a function name")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                function = {**function, "arguments": parsed}
        out.append({**call, "function": function} if "function" in call else function)
    return out


def tool_call_names(message: dict) -> list[str]:
    return [c.get("function", c)["name"] for c in message.get("tool_calls") or ()]


def check_messages(messages: object) -> list[dict]:
    """Validates and normalises the `messages` format, raising BadRow with the reason.

    Keys whose value is None are removed (columnar storage adds them to every message), content
    given as text parts is joined, and an assistant message may have `tool_calls` instead of content.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise BadRow("empty", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise BadRow("bad_role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        m = {k: v for k, v in m.items() if v is not None and not (k == "tool_calls" and v == [])}
        where = f"message {i} ({m['role']})"
        content = _text_of(m.get("content"), where)
        if "tool_calls" in m:
            if m["role"] != "assistant":
                raise BadRow("bad_tool_calls", f"{where} has tool_calls; only assistant messages may")
            m["tool_calls"] = _tool_calls(m["tool_calls"], where)
        elif content is None:
            raise BadRow("non_string_content", f"{where} has no content")
        if content is not None:
            m["content"] = content
        if not isinstance(m.get("reasoning_content", ""), str):
            raise BadRow("non_string_content", f"{where} reasoning_content is not a string")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_assistant", "conversation has no assistant turn")
    return out


def check_tools(tools: object) -> list[dict] | None:
    """The optional `tools` column: None, a list of JSON schemas, or that list as a JSON string."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise BadRow("template_error", f"tools is not valid JSON: {e}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRow("template_error", f"tools must be a list of JSON schemas, got {type(tools).__name__}")
    return tools or None
