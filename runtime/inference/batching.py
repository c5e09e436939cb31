"""Continuous batching: many sequences decoded together, one llama_batch per step.

    batcher = Batcher(model)                        # over the model's KV-cache sequences (slots)
    first = batcher.add(model.tokenize("Once upon a time"), SamplingParams(temperature=0, max_tokens=8))
    second = batcher.add(model.tokenize("The sea"), SamplingParams(max_tokens=8), logprobs=2)
    while batcher.running:
        for sequence, event in batcher.step():     # Piece, then Done (or Failed)
            ...
    batcher.close()

Each step builds one batch: the next token of every generating sequence, the oldest waiting
prompt in chunks as large as the batch allows, and then, within `prompt_budget` tokens, whole
prompts shortest first (a burst of short requests gets its first tokens over a few short steps
rather than one long one, and the oldest prompt never starves). The batch goes in ascending
sequence order: with one KV stream per sequence, llama.cpp splits a batch into micro-batches of
consecutive, increasing sequence ids, so any other order costs extra passes over the weights. One
llama_decode, then each sequence that produced logits is sampled with its own Sampler at its row.

A new sequence takes the free slot whose cached tokens share the longest prefix with its prompt
(the next turn of a chat evaluates only what it adds); with the model's prompt cache, what that
slot held is saved before it is cut back, and a saved state that shares more of the prompt is
restored into the slot first (prompt_cache.py). A slot records exactly the tokens its KV
cache holds: they are recorded only after llama_decode returns, and whatever a failed or
interrupted step left in the cache is removed when its sequence ends.

With prompt lookup (the model's `lookup`), a generating sequence also feeds up to that many
drafted tokens (propose: what followed the latest earlier occurrence of its last tokens) and its
rows are sampled one after another while each sampled token is the draft's next; the drafts after
the first miss leave the cache. The draft size halves after a step that kept none, and doubles
back after one that kept all.

The server (slim.runtime.serve), Model.complete/chat (one sequence) and the benchmarks use this.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slim.runtime.inference.errors import EngineError
from slim.runtime.inference.llama import llama_bindings
from slim.runtime.inference.reasoning import CLOSE, ThinkingSplitter
from slim.runtime.inference.sampling import Sampler, SamplingParams
from slim.runtime.inference.text import TextAssembler

if TYPE_CHECKING:
    from slim.runtime.inference.model import Model

__all__ = ["PROMPT_BUDGET", "Batch", "Batcher", "Done", "Event", "Failed", "Piece", "Sequence", "Slot", "common_prefix"]

# Prompt tokens a step takes beyond the oldest waiting prompt's chunk (8 clients: p50 first token -30%, measured)
PROMPT_BUDGET = 40


class Batch:
    """A llama_batch that holds up to `capacity` tokens, each for one sequence; free() releases it."""

    def __init__(self, capacity: int) -> None:
        self._L = llama_bindings()
        self.capacity = capacity
        self.raw = self._L.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        raw, i = self.raw, self.n
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = logits
        self.n = i + 1

    def free(self) -> None:
        if self.raw is not None:
            self._L.llama_batch_free(self.raw)
            self.raw = None


@dataclass(eq=False)
class Slot:
    """One KV-cache sequence and exactly the tokens it holds (positions 0..len-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    epoch: int = 0  # bumped by each generation that takes the slot, so a superseded one can tell


def common_prefix(a: Seq[int], b: Seq[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- the events a step hands out ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Text a sequence produced (possibly empty when only logprobs are asked for); logprobs, when
    asked for, are OpenAI's entry for the token: {"token", "logprob", "bytes", "top_logprobs"}.
    `thinking`: the text is the model's thought, not its answer (set where replies are split)."""

    text: str
    logprobs: dict[str, Any] | None = None
    thinking: bool = False


@dataclass(frozen=True, slots=True)
class Done:
    """The sequence ended: finish_reason "stop" (end-of-generation token or stop string) or "length".
    thought_tokens: how many of the completion's tokens were thought (for a thinking reply)."""

    finish_reason: str
    completion_tokens: int
    thought_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    """The sequence ended with an error (llama.cpp failed to evaluate its batch, or the caller's)."""

    error: Exception


Event = Piece | Done | Failed


@dataclass(eq=False)
class Sequence:
    """One generation in a Batcher. Read-only for callers: prompt, params, logprobs (top
    alternatives per token, None for no logprobs), slot, cached_tokens (the prompt tokens already
    in the slot's cache when it was added), generated (tokens so far), prompt_done_s
    (time.perf_counter() when its prompt had been evaluated, None before). For a reply told apart
    into thought and answer, `thought` follows where it is (None once it is closed) and
    `thought_tokens` counts the thought's tokens, for usage and for params.thinking_budget, which
    closes it (`forced`: the tokens of </think> still to write)."""

    prompt: list[int]
    params: SamplingParams
    logprobs: int | None
    slot: Slot
    sampler: Sampler
    text: TextAssembler
    epoch: int
    cached_tokens: int
    fed: int  # prompt tokens in the slot's cache
    next_token: int | None = None  # sampled, to be decoded by the next step
    generated: int = 0
    prompt_done_s: float | None = None
    thought: ThinkingSplitter | None = None
    thought_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # prompt lookup's proposals, fed after next_token
    draft_size: int = 0  # the most to propose next: halved when none was right, doubled when all were
    drafted: int = 0
    accepted: int = 0


class Batcher:
    """Continuous batching over `slots` (default: all) of one Model. Not thread-safe: one thread
    adds, steps and cancels (the server's scheduler thread, or the caller of Model.complete)."""

    def __init__(
        self,
        model: Model,
        slots: Seq[Slot] | None = None,
        *,
        prompt_budget: int = PROMPT_BUDGET,
        lookup: int | None = None,
    ) -> None:
        self.model = model
        self.prompt_budget = prompt_budget
        self.lookup = model.lookup if lookup is None else lookup  # tokens drafted per step, 0: none
        self.steps = 0  # llama_decode calls
        self._free = list(model.slots if slots is None else slots)
        self._running: list[Sequence] = []
        self._batch = Batch(model.n_batch)

    @property
    def free(self) -> int:
        """Slots free for a new sequence."""
        return len(self._free)

    @property
    def running(self) -> list[Sequence]:
        """The sequences not ended yet, oldest first."""
        return list(self._running)

    def add(
        self, prompt: Seq[int], params: SamplingParams, *, logprobs: int | None = None, thinking: bool | None = None
    ) -> Sequence:
        """Start generating after `prompt` (token ids) on the free slot that holds the longest prefix
        of it (among equals the lowest sequence id, which keeps the running sequences consecutive).
        logprobs: also hand out each token's log-probability and this many alternatives.
        thinking: the reply may think (a thinking template), starting inside a thought (True) or
        not; None: it does not, and params.thinking_budget is not applied.
        ValueError for an empty prompt, GrammarError for a grammar llama.cpp rejects, RuntimeError
        when no slot is free. The caller checks that the prompt plus max_tokens fit the context."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        if not self._free:
            raise RuntimeError("every sequence of the batcher is in use")
        slot = max(self._free, key=lambda s: (common_prefix(s.tokens, prompt), -s.seq_id))
        sampler = Sampler(self.model, params)
        try:
            if params.penalize_prompt and params.penalized:
                sampler.accept(prompt[-params.penalty_last_n :] if params.penalty_last_n else [])
            slot.epoch += 1
            self._start_from_cache(slot, prompt)
            keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)  # the last one's logits are needed
            self.model.truncate(slot, keep)
        except BaseException:
            sampler.close()
            raise
        self._free.remove(slot)
        sequence = Sequence(
            prompt,
            params,
            logprobs,
            slot,
            sampler,
            TextAssembler(params.stop),
            slot.epoch,
            cached_tokens=len(slot.tokens),
            fed=len(slot.tokens),
            thought=None if thinking is None else ThinkingSplitter(thinking),
        )
        if thinking:
            self._check_budget(sequence)  # a budget of 0: closed before the first token
        self._running.append(sequence)
        return sequence

    def _start_from_cache(self, slot: Slot, prompt: list[int]) -> None:
        """With the model's prompt cache: keep what the slot holds beyond the prompt (it is about to
        be cut) in the cache, and give the slot the cached state that continues the prompt
        furthest, when that is further than the slot's own tokens do."""
        cache = self.model.prompt_cache
        if cache is None:
            return
        shared = common_prefix(slot.tokens, prompt)
        state, cached = cache.longest(prompt)
        if shared < len(slot.tokens) and not cache.covers(slot.tokens):
            cache.put(slot.tokens, self.model.save_state(slot))
        if state is not None and cached > shared:
            self.model.restore_state(slot, state)

    def cancel(self, sequence: Sequence) -> None:
        """End a sequence now, without an event (its client went away); its slot is free again."""
        if sequence in self._running:
            self._release(sequence)

    def close(self) -> None:
        """Cancel every sequence and free the batch."""
        for sequence in list(self._running):
            self._release(sequence)
        self._batch.free()

    def step(self, before_decode: Callable[[], None] | None = None) -> list[tuple[Sequence, Event]]:
        """One llama_decode over the running sequences, then sampling: the events of this step, in
        order. before_decode runs just before llama_decode (the server hands out the previous step's
        events then: woken earlier, their readers take the GIL from the sampling loop)."""
        events: list[tuple[Sequence, Event]] = []
        running = self._running
        if not running:
            return events
        batch = self._batch
        generating = [s for s in running if s.next_token is not None]
        room = batch.capacity - len(generating)
        fed: list[tuple[Sequence, list[int]]] = []
        for s in generating:
            assert s.next_token is not None
            if self.lookup and room > 0 and not s.forced:
                size = min(s.draft_size or self.lookup, room, _left(s) - 1)
                s.draft = propose(s.slot.tokens + [s.next_token], size)
                room -= len(s.draft)
            fed.append((s, [s.next_token, *s.draft]))
        prompting = [s for s in running if s.next_token is None and s.fed < len(s.prompt)]
        if prompting and room > 0:
            oldest = prompting[0]
            fed.append((oldest, oldest.prompt[oldest.fed : oldest.fed + room]))
            budget = min(room, self.prompt_budget) - len(fed[-1][1])
            for s in sorted(prompting[1:], key=lambda s: len(s.prompt) - s.fed):
                if len(s.prompt) - s.fed > budget:
                    break
                fed.append((s, s.prompt[s.fed :]))
                budget -= len(fed[-1][1])
        if not fed:
            return events
        if len(fed) > 1:
            fed.sort(key=lambda entry: entry[0].slot.seq_id)
        batch.clear()
        sample_at: list[tuple[Sequence, int]] = []  # each sequence's first row of logits to sample
        for s, tokens in fed:
            pos = len(s.slot.tokens)
            rows = 1 + len(s.draft) if s.next_token is not None else int(s.fed + len(tokens) == len(s.prompt))
            for i, token in enumerate(tokens):
                batch.add(token, pos + i, s.slot.seq_id, i >= len(tokens) - rows)
            if rows:
                sample_at.append((s, batch.n - rows))
        if before_decode is not None:
            before_decode()
        try:
            self.steps += 1
            self.model.decode(batch)
        except EngineError as error:
            for s, _ in fed:
                self._release(s)
                events.append((s, Failed(error)))
            return events
        now = time.perf_counter()
        for s, tokens in fed:
            s.slot.tokens.extend(tokens)
            if s.next_token is None:
                s.fed += len(tokens)
                if s.fed == len(s.prompt):
                    s.prompt_done_s = now
            s.next_token = None
        for s, index in sample_at:
            self._sample_drafted(s, index, events)
        return events

    def _sample_drafted(self, s: Sequence, index: int, events: list[tuple[Sequence, Event]]) -> None:
        """Sample row after row while the token sampled is the draft's next one: each of those was
        decoded already, so it costs no step of its own. The first other token ends it (it is the
        next token to decode) and the drafts after it leave the cache. Sampling each row as if the
        tokens had come one by one keeps every sampler's output, greedy or not, what it would be
        without drafts."""
        draft, s.draft = s.draft, []
        s.drafted += len(draft)
        accepted = 0
        while self._sample(s, index + accepted, events):
            if accepted == len(draft) or s.next_token != draft[accepted]:
                break
            accepted += 1
        s.accepted += accepted
        if draft:
            size = s.draft_size or self.lookup
            if not accepted:
                s.draft_size = max(1, size // 2)
            elif accepted == len(draft):
                s.draft_size = min(self.lookup, size * 2)
        rejected = len(draft) - accepted
        if rejected and s in self._running:
            del s.slot.tokens[len(s.slot.tokens) - rejected :]
            self.model.truncate(s.slot, len(s.slot.tokens))

    def _sample(self, s: Sequence, index: int, events: list[tuple[Sequence, Event]]) -> bool:
        """Sample the token at row `index`; whether the sequence goes on (it is s.next_token)."""
        model = self.model
        if s.logprobs is not None:
            log_probs = _log_softmax(model.logits_at(index))
        if s.forced:  # the close of a thought whose budget is spent, in place of sampling
            token = s.forced.pop(0)
            s.sampler.accept([token])
        else:
            token = s.sampler.sample(index)
        if model.is_end_of_generation(token):
            self._finish(s, "stop", events)
            return False
        s.generated += 1
        data = model.token_bytes(token)
        logprobs = None if s.logprobs is None else _token_logprobs(model, log_probs, token, data, s.logprobs)
        piece = s.text.push(data)
        if piece or logprobs is not None:
            events.append((s, Piece(piece, logprobs)))
        if s.thought is not None:
            self._count_thought(s, piece)
        if s.text.stopped:
            self._finish(s, "stop", events)
        elif s.generated >= s.params.max_tokens:
            self._finish(s, "length", events)
        else:
            s.next_token = token
            return True
        return False

    def _count_thought(self, s: Sequence, piece: str) -> None:
        """One more token of a thinking reply, counted if it is thought; past the thought's budget,
        its close is queued."""
        assert s.thought is not None
        was_open = s.thought.in_thought
        s.thought.feed(piece)
        if not s.thought.in_thought:  # not opened yet, or closed by the model itself
            s.thought = None if was_open else s.thought
            return
        s.thought_tokens += was_open  # the token that opened it is not thought
        self._check_budget(s)

    def _check_budget(self, s: Sequence) -> None:
        budget = s.params.thinking_budget
        if budget is not None and s.thought_tokens >= budget:
            s.forced = self.model.tokenize(f"\n{CLOSE}\n\n", add_special=False)
            s.thought = None  # closed: nothing more to count

    def _finish(self, s: Sequence, reason: str, events: list[tuple[Sequence, Event]]) -> None:
        self._release(s)
        tail = s.text.finish()
        if tail:
            events.append((s, Piece(tail)))
        events.append((s, Done(reason, s.generated, s.thought_tokens)))

    def _release(self, s: Sequence) -> None:
        """Free the sequence's sampler and slot; the slot's cache keeps exactly what it recorded."""
        s.sampler.close()
        self._running.remove(s)
        if s.slot.epoch == s.epoch and not self.model.closed:  # a newer generation may own it now
            self.model.truncate(s.slot, len(s.slot.tokens))
        self._free.append(s.slot)


def _left(s: Sequence) -> int:
    """The tokens a sequence may still generate."""
    return s.params.max_tokens - s.generated


def propose(context: Seq[int], n: int, longest: int = 4, shortest: int = 3) -> list[int]:
    """Prompt lookup: up to `n` tokens that followed the latest earlier occurrence of the context's
    last tokens (its last `longest` down to `shortest`, the longest match first); [] when none
    occurred before. Rewriting, summarising and code edits repeat their context, so the drafts are
    often right; a wrong one costs only its row in the batch."""
    if n <= 0:
        return []
    end = len(context)
    for size in range(min(longest, end - 1), shortest - 1, -1):
        tail = list(context[end - size :])
        for start in range(end - size - 1, -1, -1):
            if context[start] == tail[0] and list(context[start : start + size]) == tail:
                return list(context[start + size : start + size + n])
    return []


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    values = logits.astype(np.float64)
    values -= values.max()
    return values - math.log(float(np.exp(values).sum()))


def _token_entry(model: Model, token: int, data: bytes | None, logprob: float) -> dict[str, Any]:
    data = model.token_bytes(token) if data is None else data
    return {"token": data.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(data)}


def _token_logprobs(model: Model, log_probs: Any, token: int, data: bytes, top: int) -> dict[str, Any]:
    import numpy as np

    entry = _token_entry(model, token, data, log_probs[token])
    candidates: Any = np.argpartition(-log_probs, top)[:top] if top else []
    best = sorted(candidates, key=lambda t: -log_probs[t])
    entry["top_logprobs"] = [_token_entry(model, int(t), None, log_probs[t]) for t in best]
    return entry
