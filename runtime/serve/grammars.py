"""JSON schemas into GBNF grammars, bounded before llama.cpp sees them.

llama-cpp-python's converter writes `maxLength: n` (and maxItems, and a pattern's `{m,n}`) as n
groups nested in one another, and llama.cpp's grammar parser recurses once per group: a schema
with maxLength 20000 overflowed the C stack and took the server down. Here the same converter
writes counted repetitions (`char{0,2000}`), which llama.cpp's parser expands into a flat chain
of rules, and a schema is refused (ValueError naming the limit) where llama.cpp could not take it:
a count above its limit of 2000 repetitions, a schema or pattern nested too deep, or more
repetitions in all than a grammar should hold.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any

from llama_cpp import llama_grammar

__all__ = ["MAX_REPETITIONS", "MAX_SCHEMA_DEPTH", "MAX_TOTAL_REPETITIONS", "schema_grammar"]

MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: its parser refuses a count above this
MAX_TOTAL_REPETITIONS = 20_000  # each counted repetition becomes that many rules in llama.cpp
MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in the schema document; parentheses in a pattern
COUNTED_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
_PATTERN_COUNT = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def counted_repetition(
    item_rule: str,
    min_items: int,
    max_items: int | None,
    separator_rule: str | None = None,
    item_rule_is_literal: bool = False,
) -> str:
    """`item_rule` repeated min_items to max_items times (None: no upper bound), separated by
    `separator_rule`, written as GBNF's counted repetition rather than as nested groups."""
    item = f"({item_rule})" if " " in item_rule and not item_rule_is_literal else item_rule
    if separator_rule is None:
        return _counted(item, min_items, max_items)
    rest = _counted(f"({separator_rule} {item})", max(min_items - 1, 0), None if max_items is None else max_items - 1)
    if max_items == 0:
        return ""
    return f"{item} {rest}".strip() if min_items > 0 else f"({item} {rest})?".replace(" )?", ")?")


def _counted(item: str, low: int, high: int | None) -> str:
    if high is None:
        return {0: f"{item}*", 1: f"{item}+"}.get(low, f"{item}{{{low},}}")
    if high == 0:
        return ""
    if (low, high) == (0, 1):
        return f"{item}?"
    return f"{item}{{{low}}}" if low == high else f"{item}{{{low},{high}}}"


def _counting(method: Any) -> Any:
    """One of the converter's methods, its repetitions written by counted_repetition (the method
    finds the repetition builder among its module's globals; the module itself is left as it is)."""
    namespace = {**vars(llama_grammar), "_build_repetition": counted_repetition}
    return types.FunctionType(method.__code__, namespace, method.__name__, method.__defaults__, method.__closure__)


class _CountingConverter(llama_grammar.SchemaConverter):
    visit = _counting(llama_grammar.SchemaConverter.visit)
    _visit_pattern = _counting(llama_grammar.SchemaConverter._visit_pattern)


def schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF for JSON matching `schema`; ValueError (naming the limit) for a schema it cannot be."""
    check_schema(schema)
    converter = _CountingConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
    converter.visit(resolved, "")
    return str(converter.format_grammar())


def check_schema(schema: Any) -> None:
    """ValueError if `schema` nests deeper than MAX_SCHEMA_DEPTH, or one of its counts (minLength,
    maxLength, minItems, maxItems, a pattern's {m,n}) passes MAX_REPETITIONS, or all of them
    together pass MAX_TOTAL_REPETITIONS."""
    total = 0
    pending: list[tuple[Any, int]] = [(schema, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            pending.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        for keyword in COUNTED_KEYWORDS:
            if keyword in node:
                total += _count(node[keyword], f"'{keyword}'")
        if isinstance(node.get("pattern"), str):
            total += _check_pattern(node["pattern"])
        if total > MAX_TOTAL_REPETITIONS:
            raise ValueError(f"the schema's lengths and counts add up to more than {MAX_TOTAL_REPETITIONS}; lower them")
        pending.extend((value, depth + 1) for value in node.values())


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPETITIONS:
        raise ValueError(f"{what} must be an integer from 0 to {MAX_REPETITIONS} (llama.cpp's limit), not {value!r}")
    return value


def _check_pattern(pattern: str) -> int:
    """The repetitions a pattern's counts ask for; ValueError past the limits."""
    depth = deepest = 0
    escaped = False
    for char in pattern:
        if not escaped and char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif not escaped and char == ")":
            depth -= 1
        escaped = char == "\\" and not escaped
    if deepest > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the pattern nests groups deeper than {MAX_SCHEMA_DEPTH} levels")
    total = 0
    for low, high in _PATTERN_COUNT.findall(pattern):
        for number in (low, high):
            if number:
                total += _count(int(number), f"the pattern's repetition count {{{low},{high}}}")
    return total
