"""The server's metrics, for GET /metrics in Prometheus' text format: requests by route, model and
status; prompt, cached and generated tokens by model; time to first token and time per output
token as histograms; and, read from the pool when asked, queue depth, running requests and the
loaded models with their estimated memory. Everything is counted on the event loop's thread."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

from slim.runtime.serve.pool import ModelPool

__all__ = ["Histogram", "Metrics"]

Labels = tuple[tuple[str, str], ...]

FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


class Histogram:
    """Observations counted in cumulative buckets (upper bounds, in seconds), per label set."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = collections.defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[labels] += value

    def lines(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, counts in sorted(self._counts.items()):
            total = 0
            for bound, count in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
                total += count
                lines.append(f"{self.name}_bucket{_labels((*labels, ('le', bound)))} {total}")
            lines.append(f"{self.name}_sum{_labels(labels)} {self._sums[labels]}")
            lines.append(f"{self.name}_count{_labels(labels)} {total}")
        return lines


class Metrics:
    """What the routes count, and the text GET /metrics answers."""

    def __init__(self) -> None:
        self.requests: collections.Counter[Labels] = collections.Counter()
        self.tokens: dict[str, collections.Counter[str]] = {
            "prompt": collections.Counter(),
            "cached": collections.Counter(),
            "generated": collections.Counter(),
        }
        self.first_token = Histogram(
            "slim_time_to_first_token_seconds", "From the request's arrival to its first token.", FIRST_TOKEN_BUCKETS
        )
        self.per_token = Histogram(
            "slim_time_per_output_token_seconds", "Between one generated token and the next.", TOKEN_BUCKETS
        )

    def request(self, route: str, model: str | None, status: int | None) -> None:
        self.requests[(("route", route), ("model", model or ""), ("status", str(status or 0)))] += 1

    def generated(self, model: str, prompt: int, cached: int, completion: int) -> None:
        self.tokens["prompt"][model] += prompt
        self.tokens["cached"][model] += cached
        self.tokens["generated"][model] += completion

    def render(self, pool: ModelPool) -> str:
        lines = [
            "# HELP slim_requests_total Requests answered, by route, model and status.",
            "# TYPE slim_requests_total counter",
        ]
        lines += [f"slim_requests_total{_labels(labels)} {n}" for labels, n in sorted(self.requests.items())]
        helps = {
            "prompt": "Prompt tokens of generation requests.",
            "cached": "Prompt tokens found in a sequence's KV cache, not evaluated again.",
            "generated": "Tokens generated.",
        }
        for kind, counter in self.tokens.items():
            name = f"slim_{kind}_tokens_total"
            lines += [f"# HELP {name} {helps[kind]}", f"# TYPE {name} counter"]
            lines += [f"{name}{_labels((('model', m),))} {n}" for m, n in sorted(counter.items())]
        lines += self.first_token.lines() + self.per_token.lines()
        health: dict[str, Any] = pool.health()
        gauges = [
            ("slim_requests_running", "Requests being decoded.", "running"),
            ("slim_requests_waiting", "Requests waiting for a sequence (the queue's depth).", "waiting"),
            (
                "slim_model_memory_bytes",
                "Estimated memory of a loaded model (file, KV cache, buffers).",
                "memory_bytes",
            ),
        ]
        for name, help_text, key in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for model, state in sorted(health["models"].items()):
                if key in state:
                    lines.append(f"{name}{_labels((('model', model),))} {state[key]}")
        lines += ["# HELP slim_models_loaded Models loaded now.", "# TYPE slim_models_loaded gauge"]
        lines.append(f"slim_models_loaded {sum(1 for s in health['models'].values() if s['state'] == 'loaded')}")
        lines += [
            "# HELP slim_memory_budget_bytes The memory the loaded models may take.",
            "# TYPE slim_memory_budget_bytes gauge",
        ]
        lines.append(f"slim_memory_budget_bytes {health['memory_budget_bytes']}")
        return "\n".join(lines) + "\n"
