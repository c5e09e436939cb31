"""Chat templates: Hugging Face style Jinja templates rendered in jinja2's immutable sandbox (a
template cannot touch Python objects or files), and the fallback for a GGUF that has none."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from slim.runtime.inference.errors import TemplateError

__all__ = ["FALLBACK_STOPS", "FALLBACK_TEMPLATE", "compile_template", "render_chat", "sandboxed_environment"]

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


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
) -> str:
    """Render `messages` ({"role", "content"} dicts) with a Hugging Face style Jinja chat template,
    in jinja2's immutable sandbox. `tools` (OpenAI's function list) is passed to templates that
    render it; `compiled` is the template from compile_template, to skip compiling it again."""
    from jinja2 import TemplateError as JinjaError

    messages = _check_messages(messages)
    extra = {} if tools is None else {"tools": list(tools)}  # a template may test `tools is defined`
    try:
        tmpl = compiled if compiled is not None else sandboxed_environment().from_string(template)
        return tmpl.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"the chat template failed to render: {exc.__class__.__name__}: {exc}") from None
