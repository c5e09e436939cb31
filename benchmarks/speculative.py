"""Speculative decoding by prompt lookup (`--lookup N`) against plain decoding, on the real model, in one
run: the same GGUF, threads and prompts, greedy, the two models taking turns (--repeat rounds, the
median reported), so that background load hits both alike.

    python benchmarks/speculative.py [--threads 1] [--tokens 192] [--lookup 8] [--repeat 3]

Tasks: rewriting a given ~1,000-token text (wiki test text) and editing a given function, where a
reply repeats its input; and an open question, where it does not (drafts are seldom right and
cost their rows in the batch). Prints per task the generation tokens/s of both, the ratio, the
drafted and accepted tokens, and whether the two replies are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slim.runtime import inference
from slim.runtime.store import assets

FUNCTION = """def moving_average(values, window):
    result = []
    for i in range(len(values)):
        start = max(0, i - window + 1)
        chunk = values[start:i + 1]
        result.append(sum(chunk) / len(chunk))
    return result


def normalise(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low) for v in values]
"""


def tasks(tokens_of: int) -> dict[str, str]:
    text = assets.wiki_text("test").read_text(encoding="utf-8")
    passage = " ".join(text.split()[: int(tokens_of * 0.75)])  # about tokens_of tokens of English
    return {
        "rewrite a 1,000-token text": f"Repeat this text exactly, word for word:\n\n{passage}",
        "edit a function": f"Add type hints to these functions and return the whole code:\n\n{FUNCTION}",
        "open question": "Why do cats purr? Explain in detail.",
    }


def run(model: inference.Model, prompt: str, tokens: int) -> inference.Result:
    """One greedy reply with the whole prompt evaluated afresh: a prompt taken from the cache is
    evaluated in other batches, whose logits may differ in the last bits and so the reply."""
    model.clear_cache()
    result = model.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=tokens)
    assert isinstance(result, inference.Result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--lookup", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = args.model or assets.fetch("smollm2-135m-instruct-q4_1.gguf")
    options = {"n_ctx": 2048, "n_threads": args.threads}
    with inference.load(path, **options) as plain, inference.load(path, lookup=args.lookup, **options) as drafting:
        for name, prompt in tasks(1000).items():
            speeds: dict[str, list[float]] = {"plain": [], "lookup": []}
            texts: dict[str, set[str]] = {"plain": set(), "lookup": set()}
            last = None
            for _ in range(args.repeat):
                for label, model in (("plain", plain), ("lookup", drafting)):
                    result = run(model, prompt, args.tokens)
                    speeds[label].append(result.timings.generation_tokens_per_s)
                    texts[label].add(result.text)
                    if label == "lookup":
                        last = result
            assert last is not None
            plain_speed, lookup_speed = (statistics.median(speeds[k]) for k in ("plain", "lookup"))
            line = {
                "task": name,
                "tokens": last.completion_tokens,
                "plain_tok_s": round(plain_speed, 1),
                "lookup_tok_s": round(lookup_speed, 1),
                "ratio": round(lookup_speed / plain_speed, 2),
                "drafted": last.timings.drafted_tokens,
                "accepted": last.timings.accepted_tokens,
                "identical": len(texts["plain"]) == 1 and texts["plain"] == texts["lookup"],
            }
            print(json.dumps(line))


if __name__ == "__main__":
    main()
