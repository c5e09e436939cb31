"""Tool calls: the grammar that forces one, and the calls parsed out of a reply."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from slim.runtime.serve.requests import bad_request

__all__ = ["parse_tool_calls", "tool_call_grammar"]

_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def tool_call_grammar(tools: list[dict[str, Any]], forced: str, tagged: bool) -> str:
    """GBNF for one call of the forced function (or of any tool when forced is ""), written as
    {"name": ..., "arguments": {...}}, inside <tool_call> tags when the template uses them."""
    from slim.runtime.serve.grammars import schema_grammar

    choices = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in tools
        if not forced or t["function"]["name"] == forced
    ]
    try:
        grammar = schema_grammar({"anyOf": choices})
    except Exception as exc:
        raise bad_request(f"the parameters schema of the tools is not supported: {exc}", "tools") from None
    if not tagged:
        return grammar
    grammar = re.sub(r"^root ::=", "call ::=", grammar, flags=re.M)
    return 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' + grammar


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content left, the tool calls) of a reply: <tool_call>{"name", "arguments"}</tool_call>
    blocks, or a reply that is one such JSON object. No calls: (text, [])."""
    blocks = _TAGGED_CALL.findall(text)
    candidates = blocks or ([text.strip()] if text.strip().startswith("{") else [])
    calls = []
    for block in candidates:
        try:
            value = json.loads(block)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            calls.append(
                {
                    "id": "call_" + uuid.uuid4().hex[:24],
                    "type": "function",
                    "function": {
                        "name": value["name"],
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments, ensure_ascii=False),
                    },
                }
            )
    if not calls:
        return text, []
    content = _TAGGED_CALL.sub("", text).strip() if blocks else ""
    return content or None, calls
