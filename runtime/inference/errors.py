"""The errors of the inference layer (GGUFError, for a file that is not a usable GGUF, comes from formats)."""

from __future__ import annotations

from slim.runtime.formats.gguf_file import GGUFError

__all__ = ["ContextError", "EngineError", "GGUFError", "TemplateError"]


class EngineError(RuntimeError):
    """llama.cpp could not load the model, create the context or evaluate a batch."""


class ContextError(ValueError):
    """The prompt plus the tokens to generate do not fit in the context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int, detail: str = "") -> None:
        self.prompt_tokens, self.max_tokens, self.n_ctx = prompt_tokens, max_tokens, n_ctx
        message = (
            f"the prompt is {prompt_tokens} tokens and up to {max_tokens} tokens are to be generated: "
            f"{prompt_tokens + max_tokens} do not fit in the context of {n_ctx} tokens"
        )
        super().__init__(
            message + (f" {detail}" if detail else "; shorten the prompt, lower max_tokens or use a larger context")
        )


class TemplateError(ValueError):
    """The chat template failed to render the messages (or the messages are malformed)."""
