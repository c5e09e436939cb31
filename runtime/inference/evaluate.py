"""slim eval: what a quantized file lost, in numbers.

Perplexity follows llama.cpp's llama-perplexity exactly: the text is tokenized once (with BOS where
the model adds one), cut into chunks of n_ctx tokens, each chunk is evaluated from an empty cache
(its first token replaced by BOS when the model uses one), and only the second half of each chunk
is scored, so every scored token sees at least n_ctx/2 tokens of context. The error estimate is
the standard error of the mean negative log-likelihood, carried to perplexity.

Against a reference (usually the F16 or Q8_0 of the same model) the same positions give the
KL divergence KL(reference || model) of the full next-token distributions, how often both pick
the same top token, and the RMS of the change in the probability of the actual next token, as
llama-perplexity --kl-divergence reports them. The reference's log-probabilities can be saved
once (`save_logits`) and reused, so the reference model need not be loaded again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slim.runtime.files import atomic_open
from slim.runtime.formats.quality import Quality


class EvalError(ValueError):
    """An evaluation that cannot go ahead; the message says what to do."""


@dataclass
class Divergence:
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    rms_delta_p: float


@dataclass
class EvalReport:
    model: str
    size_bytes: int
    bits_per_weight: float
    n_ctx: int
    chunks: int
    tokens_scored: int
    perplexity: float
    perplexity_error: float
    divergence: Divergence | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64 (llama-perplexity sums exp in double too)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: whole n_ctx-token windows, the first token replaced by BOS
    when the model adds one."""
    chunks = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = tokens[start : start + n_ctx]
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


class ReferenceLogits:
    """The reference's log-probabilities at the scored positions, per chunk, with the tokens
    they were computed on (a saved file is only valid for the same tokens)."""

    def __init__(self, tokens: list[int], n_ctx: int, log_probs: list[np.ndarray]):
        self.tokens, self.n_ctx, self.log_probs = tokens, n_ctx, log_probs

    def save(self, path: Path) -> None:
        with atomic_open(path) as partial:
            np.savez(
                partial,
                tokens=np.array(self.tokens, dtype=np.int32),
                n_ctx=np.int32(self.n_ctx),
                log_probs=np.stack(self.log_probs).astype(np.float16),
            )

    def perplexity(self) -> float:
        """The reference's own perplexity over the scored positions of its chunks."""
        first, nll = self.n_ctx // 2, []
        for index, log_p in enumerate(self.log_probs):
            start = index * self.n_ctx
            targets = np.array(self.tokens[start + first + 1 : start + self.n_ctx])
            nll.append(-log_p[np.arange(len(targets)), targets])
        return math.exp(float(np.concatenate(nll).mean()))

    @classmethod
    def load(cls, path: Path) -> ReferenceLogits:
        try:
            with np.load(path) as data:
                log_probs = data["log_probs"].astype(np.float64)
                return cls(data["tokens"].tolist(), int(data["n_ctx"]), list(log_probs))
        except (OSError, KeyError, ValueError) as exc:
            raise EvalError(f"{path} is not a logits file written by --save-logits ({exc})") from None


def evaluate(
    model_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    reference: Path | ReferenceLogits | None = None,
    save_logits: Path | None = None,
    n_threads: int | None = None,
    chunks: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[EvalReport, ReferenceLogits | None]:
    """Perplexity of a GGUF on `text`, and its divergence from `reference` (a GGUF or saved logits).
    chunks: score only the first this many chunks (default all).

    Returns the report and, when a reference GGUF was evaluated, its logits (for reuse across
    several models). progress(done, total) is called after each chunk.
    """
    from slim.runtime import inference
    from slim.runtime.formats.model_info import describe

    if n_ctx < 16 or n_ctx % 2:
        raise EvalError(f"--ctx must be an even number of at least 16, got {n_ctx}")
    model = inference.load(model_path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads)
    ref_model = None
    try:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        windows = chunk_tokens(tokens, n_ctx, model.prompt_bos)[:chunks]
        if not windows:
            raise EvalError(
                f"the text is {len(tokens)} tokens, shorter than one chunk of --ctx {n_ctx}; "
                "give a longer text or a smaller --ctx"
            )
        if isinstance(reference, (str, Path)) and Path(reference).suffix != ".npz":
            ref_model = inference.load(reference, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads)
            if ref_model.tokenize(text, add_special=True, parse_special=False) != tokens:
                raise EvalError(f"{reference} tokenizes the text differently: it is not the same model's reference")
            reference = ReferenceLogits(tokens, n_ctx, [])
        elif isinstance(reference, (str, Path)):
            reference = ReferenceLogits.load(Path(reference))
        if isinstance(reference, ReferenceLogits) and ref_model is None:
            if reference.tokens != tokens or reference.n_ctx != n_ctx:
                raise EvalError("the saved reference logits were computed on another text or --ctx")
            if len(reference.log_probs) < len(windows):
                raise EvalError(
                    f"the saved reference logits cover {len(reference.log_probs)} chunks, not {len(windows)}: "
                    "save them again over as many chunks"
                )

        first = n_ctx // 2
        nll: list[np.ndarray] = []
        kl: list[np.ndarray] = []
        same_top: list[np.ndarray] = []
        delta_p: list[np.ndarray] = []
        for index, chunk in enumerate(windows):
            targets = np.array(chunk[first + 1 :])
            rows = np.arange(len(targets))
            log_p = log_softmax(model.logits(chunk, first)[:-1])
            nll.append(-log_p[rows, targets])
            if reference is not None:
                if ref_model is not None:
                    ref = log_softmax(ref_model.logits(chunk, first)[:-1])
                    reference.log_probs.append(ref)
                else:
                    ref = reference.log_probs[index]
                p_ref = np.exp(ref)
                kl.append((p_ref * (ref - log_p)).sum(axis=-1))
                same_top.append(ref.argmax(-1) == log_p.argmax(-1))
                delta_p.append(np.exp(log_p[rows, targets]) - p_ref[rows, targets])
            if progress:
                progress(index + 1, len(windows))
    finally:
        model.close()
        if ref_model is not None:
            ref_model.close()

    losses = np.concatenate(nll)
    mean = float(losses.mean())
    variance = float((losses**2).mean()) - mean * mean
    ppl = math.exp(mean)
    error = math.sqrt(variance / (len(losses) - 1)) * ppl if variance > 0 and len(losses) > 1 else 0.0
    divergence = None
    if kl:
        k = np.concatenate(kl)
        divergence = Divergence(
            kl_mean=float(k.mean()),
            kl_median=float(np.median(k)),
            kl_p99=float(np.percentile(k, 99)),
            kl_max=float(k.max()),
            top1_agreement=float(np.concatenate(same_top).mean()),
            rms_delta_p=float(np.sqrt((np.concatenate(delta_p) ** 2).mean())),
        )
    info = describe(Path(model_path))
    if save_logits is not None:
        if not isinstance(reference, ReferenceLogits):
            raise EvalError("--save-logits needs --reference MODEL.gguf: it saves the reference's logits")
        reference.save(Path(save_logits))
    report = EvalReport(
        str(model_path), info.size_bytes, info.bits_per_weight, n_ctx, len(windows), len(losses), ppl, error, divergence
    )
    return report, reference if isinstance(reference, ReferenceLogits) else None


def reports_json(reports: list[EvalReport]) -> str:
    return json.dumps([r.to_dict() for r in reports], indent=2)


def measured_quality(
    report: EvalReport,
    reference: ReferenceLogits,
    text: str,
    text_name: str,
    reference_name: str,
    predicted_kl: float | None = None,
) -> Quality:
    """What `report` (made against `reference` on `text`) says of the file, as its metadata records it."""
    if report.divergence is None:
        raise EvalError("the quality written into a file needs a reference: give --reference MODEL.gguf")
    return Quality(
        kl_mean=report.divergence.kl_mean,
        kl_p99=report.divergence.kl_p99,
        perplexity=report.perplexity,
        reference_perplexity=reference.perplexity(),
        reference=reference_name,
        text=text_name,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        ctx=report.n_ctx,
        tokens=report.tokens_scored,
        predicted_kl=predicted_kl,
    )
