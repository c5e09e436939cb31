"""Chat templates: Hugging Face style Jinja templates rendered in jinja2's immutable sandbox (a
template cannot touch Python objects or files), and the fallback for a GGUF that has none.

A template comes with the GGUF, so it is untrusted code: besides the sandbox, rendering is bounded
in time (a loop nested to run 10^10 times is stopped after RENDER_SECONDS) and `*` / `**` cannot
build a string, list or number of more than MAX_RESULT items or digits in one step."""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from slim.runtime.inference.errors import TemplateError

__all__ = [
    "FALLBACK_STOPS",
    "FALLBACK_TEMPLATE",
    "RENDER_SECONDS",
    "compile_template",
    "mask_markers",
    "render_chat",
    "sandboxed_environment",
]

# Real chat templates render in milliseconds; a template that takes seconds is broken or hostile.
RENDER_SECONDS = 2.0
MAX_RESULT = 1 << 20

# Used when a GGUF carries no tokenizer.chat_template: ChatML, the most common layout. The engine
# says so (Model.template_warning) and adds the layout's markers as stop strings.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOPS = ("<|im_end|>", "<|im_start|>")


def sandboxed_environment() -> Any:
    """A jinja2 ImmutableSandboxedEnvironment laid out as Hugging Face's chat templates expect, with
    their helpers raise_exception (a TemplateError) and strftime_now."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the messages: {message}")

    def strftime_now(fmt: str) -> str:
        return time.strftime(fmt)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `"a" * 10**10` and `10 ** 10**10` before Python spends memory and minutes on them."""
    if operator == "*":
        for sized, times in ((left, right), (right, left)):
            if isinstance(sized, str | list | tuple) and isinstance(times, int) and len(sized) * times > MAX_RESULT:
                raise TemplateError(f"the chat template builds a sequence of more than {MAX_RESULT} items")
    elif isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > 4 * MAX_RESULT:
        raise TemplateError(f"the chat template computes a number of more than {MAX_RESULT} digits")


def compile_template(template: str) -> Any:
    """The template compiled in the sandbox; TemplateError if it does not compile."""
    from jinja2 import TemplateError as JinjaError

    try:
        return sandboxed_environment().from_string(template)
    except JinjaError as exc:
        raise TemplateError(f"the chat template does not compile: {exc}") from None


def _check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise TemplateError("there are no messages to send")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TemplateError(f"message {i} must be a dict with a 'role' and a 'content' string")
        if not isinstance(message.get("content"), str):
            raise TemplateError(f"message {i} ({message['role']}) has no 'content' string")
        checked.append(dict(message))
    return checked


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    compiled: Any = None,
    tools: Sequence[dict[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render `messages` ({"role", "content"} dicts) with a Hugging Face style Jinja chat template,
    in jinja2's immutable sandbox. `tools` (OpenAI's function list) is passed to templates that
    render it; `variables` are the request's own (chat_template_kwargs: enable_thinking...), which
    cannot replace the ones set here; `compiled` is the template from compile_template, to skip
    compiling it again."""
    from jinja2 import TemplateError as JinjaError

    messages = _check_messages(messages)
    extra = {} if tools is None else {"tools": list(tools)}  # a template may test `tools is defined`
    try:
        tmpl = compiled if compiled is not None else sandboxed_environment().from_string(template)
        context = {
            **(variables or {}),
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
            **extra,
        }
        return _render_bounded(tmpl, context)
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"the chat template failed to render: {exc.__class__.__name__}: {exc}") from None


def mask_markers(value: Any, markers: Sequence[str]) -> tuple[Any, dict[str, str]]:
    """`value` (messages or tools: dicts, lists and strings) with each marker found in its strings
    (not in its keys) replaced by a placeholder character of its own, from Unicode's private use
    planes and absent from `value`, and {placeholder: marker}; (value, {}) when no marker is there.
    The template renders the placeholders as it would any text, so that what is rendered from the
    messages can be told from what the template wrote itself (chat_tokens' markers)."""
    strings: list[str] = []
    _strings(value, strings)
    found = sorted({m for m in markers if m and any(m in s for s in strings)}, key=len, reverse=True)
    if not found:
        return value, {}
    used = set("".join(strings))
    free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
    placeholders = {marker: next(free) for marker in found}
    pattern = re.compile("|".join(re.escape(m) for m in found))
    return _replaced(value, lambda s: pattern.sub(lambda m: placeholders[m.group(0)], s)), {
        p: m for m, p in placeholders.items()
    }


def _strings(value: Any, into: list[str]) -> None:
    if isinstance(value, str):
        into.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, into)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _strings(item, into)


def _replaced(value: Any, replace: Any) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {key: _replaced(item, replace) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replaced(item, replace) for item in value]
    return value


class _RenderTimeout(Exception):
    pass


def _render_bounded(tmpl: Any, variables: dict[str, Any]) -> str:
    """tmpl.render(variables) in a thread of its own, stopped after RENDER_SECONDS: a template is pure
    Python, so an exception raised asynchronously in that thread ends it at its next bytecode."""
    outcome: list[Any] = []

    def render() -> None:
        try:
            outcome.append(tmpl.render(**variables))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=render, name="chat-template", daemon=True)
    worker.start()
    worker.join(RENDER_SECONDS)
    if not outcome and worker.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_RenderTimeout))
        worker.join()
    result = outcome[0]
    if isinstance(result, _RenderTimeout):
        raise TemplateError(
            f"the chat template did not finish rendering in {RENDER_SECONDS:g} s (a loop that runs too long); "
            "the model's template is broken: use a GGUF with a working one"
        )
    if isinstance(result, BaseException):
        raise result
    return str(result)
