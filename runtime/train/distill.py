"""slim distill: train a student on a teacher's whole next-token distribution (knowledge distillation).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(text, student)

where _T is a softmax at temperature T. Three uses: a smaller student, healing a pruned model with
its unpruned self as teacher, and quantization-aware training (slim.runtime.train.qat).

Offline distillation (the default): the teacher is any GGUF, run once by llama.cpp over the text;
its top-k log-probabilities at every position are cached on disk (keyed by sha256 of the teacher
file, the text, the sequence length and k) and reused across epochs and runs. The KL term then
compares k + 1 outcomes: the teacher's top-k tokens and one tail bucket with the rest of its
probability (see `distill_loss`). Online distillation (`online=True`) runs an HF teacher in torch in the same
step and uses its full distribution.

Training state (weights, optimizer, step, RNG) is checkpointed atomically every `save_every`
steps to OUT.ckpt; `resume=True` continues from it bit for bit. The batch of each step is a pure
function of the step and the seed, so no data-loader state needs saving.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slim.runtime.files import atomic_open, file_sha256
from slim.runtime.formats.mixes import Mix
from slim.runtime.inference.evaluate import chunk_tokens, log_softmax
from slim.runtime.store.assets import slim_home
from slim.runtime.train import student as student_lib

CACHE_VERSION = 1
# The tail bucket holds at least this much probability, so an empty tail (k = vocabulary) stays finite.
_TAIL_FLOOR = 1e-9
_LOG_TAIL_FLOOR = math.log(_TAIL_FLOOR)  # ~ -20.7


class DistillError(ValueError):
    """A distillation that cannot go ahead; the message says what to do."""


@dataclass
class Options:
    """Training options: `distill` and `qat` take them as keyword arguments."""

    steps: int = 100
    lr: float = 1e-4
    seq_len: int = 256
    batch_size: int = 4
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int = 32
    warmup: int = 10
    save_every: int = 50
    seed: int = 0
    threads: int | None = None
    time_limit: float | None = None  # seconds: stop (and checkpoint) after the step that passes it

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.top_k < 1 or self.save_every < 1:
            raise DistillError("steps, batch size, top-k and save-every must be at least 1")
        if self.seq_len < 8:
            raise DistillError(f"the sequence length must be at least 8 tokens, got {self.seq_len}")
        if not 0 <= self.alpha <= 1:
            raise DistillError(f"alpha weighs KL against cross-entropy: it must lie in 0..1, got {self.alpha}")
        if self.temperature <= 0 or self.lr <= 0:
            raise DistillError("the temperature and the learning rate must be positive")

    def resumable(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in ("save_every", "threads", "time_limit")}


@dataclass
class Summary:
    output: str
    steps: int
    tokens_trained: int
    first_loss: float
    last_loss: float
    seconds: float
    gguf: str | None = None
    losses: list[float] = field(default_factory=list, repr=False)
    # With held-out validation: the KL to the teacher there before training and of the state kept.
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    best_step: int | None = None  # the step whose state was kept (0: the starting point)

    def line(self) -> str:
        extra = f", and {self.gguf}" if self.gguf else ""
        line = (
            f"wrote {self.output}{extra}: {self.steps} steps, {self.tokens_trained} tokens, "
            f"loss {self.first_loss:.4f} -> {self.last_loss:.4f} in {self.seconds:.0f} s"
        )
        if self.heldout_kl_before is None or self.heldout_kl_after is None:
            return line
        if self.best_step == 0:
            return (
                f"{line}; held-out KL {self.heldout_kl_before:.4f}: training never beat the starting point, "
                "so the file holds the post-training weights"
            )
        return (
            f"{line}; held-out KL {self.heldout_kl_before:.4f} -> {self.heldout_kl_after:.4f} "
            f"(the state of step {self.best_step} kept)"
        )

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "losses"})


# ----------------------------------------------------------------------------- the data


@dataclass
class Targets:
    """Token sequences (n, seq_len) and, for offline distillation, the teacher's top-k at each of
    the first seq_len - 1 positions: ids (n, seq_len - 1, k) and log-probabilities (same shape)."""

    tokens: np.ndarray
    top_ids: np.ndarray | None = None
    top_log_probs: np.ndarray | None = None


def cache_key(teacher: Path, text: str, seq_len: int, top_k: int) -> str:
    """sha256 of everything the cached top-k depends on: the teacher's bytes, the text, seq_len, k."""
    parts = [
        f"v{CACHE_VERSION}",
        file_sha256(teacher),
        hashlib.sha256(text.encode()).hexdigest(),
        str(seq_len),
        str(top_k),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def teacher_targets(
    teacher: Path,
    text: str,
    seq_len: int,
    top_k: int,
    *,
    threads: int | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Targets:
    """The text tokenized by the teacher GGUF and cut into seq_len windows (BOS first where the
    model uses one), with the teacher's top-k log-probabilities per position, from the cache
    when present."""
    from slim.runtime import inference

    cache_dir = Path(cache_dir) if cache_dir is not None else slim_home() / "distill-cache"
    path = cache_dir / f"{cache_key(teacher, text, seq_len, top_k)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return Targets(data["tokens"], data["top_ids"], data["top_log_probs"])
    with inference.load(teacher, n_ctx=seq_len, n_batch=min(seq_len, 512), n_threads=threads) as model:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        chunks = chunk_tokens(tokens, seq_len, model.prompt_bos)
        if not chunks:
            raise DistillError(
                f"the text is {len(tokens)} tokens, shorter than one sequence of {seq_len}; "
                "give a longer text or a shorter --seq-len"
            )
        ids = np.empty((len(chunks), seq_len - 1, top_k), dtype=np.int32)
        values = np.empty((len(chunks), seq_len - 1, top_k), dtype=np.float32)
        for index, chunk in enumerate(chunks):
            log_p = log_softmax(model.logits(chunk)[:-1])
            top = np.argpartition(-log_p, top_k - 1, axis=-1)[:, :top_k]
            ids[index] = top
            values[index] = np.take_along_axis(log_p, top, axis=-1)
            if progress:
                progress(index + 1, len(chunks))
    targets = Targets(np.array(chunks, dtype=np.int64), ids, values)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as partial:  # two runs may fill the same entry at once: each has its own temporary
        np.savez(partial, tokens=targets.tokens, top_ids=ids, top_log_probs=values)
    return targets


def check_vocabulary(student_dir: Path, teacher_tokens: list[str]) -> None:
    """The student must share the teacher's tokenizer: the same token at every id."""
    from slim.runtime.formats.tokenizer import TokenizerError, read_hf_tokenizer

    try:
        mine = read_hf_tokenizer(student_dir).tokens
    except TokenizerError as exc:
        raise DistillError(f"the student's tokenizer: {exc}") from None
    if mine != teacher_tokens:
        differ = next(
            (i for i, (a, b) in enumerate(zip(mine, teacher_tokens, strict=False)) if a != b),
            min(len(mine), len(teacher_tokens)),
        )
        raise DistillError(
            f"the student's vocabulary differs from the teacher's ({len(mine)} vs "
            f"{len(teacher_tokens)} tokens, first difference at id {differ}): "
            "distillation needs the teacher's tokenizer"
        )


def gguf_tokens(path: Path) -> list[str]:
    from slim.runtime.formats.gguf_file import open_gguf
    from slim.runtime.formats.tokenizer import read_gguf_tokenizer

    return read_gguf_tokenizer(open_gguf(path)).tokens


# ----------------------------------------------------------------------------- the loss


def distill_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    top_ids: torch.Tensor | None = None,
    top_log_probs: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, cross-entropy) for student logits (B, L, V) on token sequences (B, L).

    Position t predicts token t+1, so the last position is not scored. The teacher is either its
    full logits (online) or its top-k: ids and log-probabilities at each position (offline). The
    top-k KL compares k + 1 outcomes, the k tokens and one tail bucket holding the rest of the
    mass (exact for the teacher: its top-k log-probabilities are normalised over the whole
    vocabulary), each distribution tempered at T over those outcomes. At T = 1 it is a lower bound
    of the full KL that is 0 only when the student matches the teacher on the top-k tokens and in
    total tail mass; renormalising the top-k instead would reward a student that drops the tail."""
    logits = logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    if teacher_logits is not None:
        teacher_t = F.log_softmax(teacher_logits[:, :-1] / temperature, dim=-1)
        student_t = F.log_softmax(logits / temperature, dim=-1)
    else:
        if top_ids is None or top_log_probs is None:
            raise ValueError("distill_loss needs teacher_logits, or both top_ids and top_log_probs")
        student = F.log_softmax(logits, dim=-1)
        student_tail = student.scatter(-1, top_ids, float("-inf")).logsumexp(-1, keepdim=True)
        teacher_tail = (1 - top_log_probs.exp().sum(-1, keepdim=True)).clamp(min=_TAIL_FLOOR).log()
        buckets = (
            torch.cat([student.gather(-1, top_ids), student_tail.clamp(min=_LOG_TAIL_FLOOR)], -1),
            torch.cat([top_log_probs, teacher_tail], -1),
        )
        student_t, teacher_t = (F.log_softmax(b / temperature, dim=-1) for b in buckets)
    kl = (teacher_t.exp() * (teacher_t - student_t)).sum(-1).mean()
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, kl.detach(), ce.detach()


# ----------------------------------------------------------------------------- training


def batch_indices(step: int, batch_size: int, n_sequences: int, seed: int) -> np.ndarray:
    """The sequences of a step: each epoch visits every sequence once, in an order fixed by seed."""
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, positions = flat // n_sequences, flat % n_sequences
    return np.array(
        [
            np.random.default_rng([seed, int(e)]).permutation(n_sequences)[p]
            for e, p in zip(epochs, positions, strict=True)
        ]
    )


def learning_rate(step: int, options: Options) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    span = max(1, options.steps - options.warmup)
    progress = min(1.0, (step - options.warmup) / span)
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Validation:
    """Held-out sequences with the teacher's top-k, scored (KL to the teacher, T = 1) before training
    and every `every` steps. Training keeps the best-scoring state, the starting one included, and
    stops once `patience` scores in a row fail to beat it: a run can only end closer to the
    teacher on text it did not train on, never further."""

    targets: Targets
    every: int
    patience: int = 3
    scores: list[tuple[int, float]] = field(default_factory=list)  # (step, KL)

    @property
    def best(self) -> tuple[int, float]:
        return min(self.scores, key=lambda score: (score[1], score[0]))


def heldout_kl(model: torch.nn.Module, targets: Targets, batch_size: int) -> float:
    """Mean top-k KL(teacher || model) over the sequences, as the training loss measures it."""
    if targets.top_ids is None or targets.top_log_probs is None:
        raise DistillError("held-out validation needs the teacher's top-k for its sequences")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(targets.tokens), batch_size):
            rows = slice(start, start + batch_size)
            tokens = torch.from_numpy(targets.tokens[rows])
            _, kl, _ = distill_loss(
                model(tokens),
                tokens,
                alpha=1.0,
                temperature=1.0,
                top_ids=torch.from_numpy(targets.top_ids[rows]).long(),
                top_log_probs=torch.from_numpy(targets.top_log_probs[rows]),
            )
            total += float(kl) * len(tokens)
            count += len(tokens)
    return total / count


def split_heldout(targets: Targets, fraction: float) -> tuple[Targets, Targets]:
    """(training, held-out): the last `fraction` of the sequences (at least one) held out."""
    n = len(targets.tokens)
    if n < 2:
        raise DistillError(
            f"the text gives {n} sequence; held-out validation needs at least 2: give a longer text, "
            "a shorter --seq-len, or --eval-text"
        )
    held = max(1, round(n * fraction))

    def part(rows: slice) -> Targets:
        return Targets(
            targets.tokens[rows],
            None if targets.top_ids is None else targets.top_ids[rows],
            None if targets.top_log_probs is None else targets.top_log_probs[rows],
        )

    return part(slice(0, n - held)), part(slice(n - held, n))


def train(
    model: torch.nn.Module,
    targets: Targets,
    options: Options,
    checkpoint: Path,
    *,
    resume: bool = False,
    teacher: torch.nn.Module | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    validation: Validation | None = None,
) -> list[float]:
    """Train `model` in place for options.steps steps (fewer when options.time_limit runs out or
    validation stops it early); returns the loss of each step run here.

    checkpoint: where training state is saved every options.save_every steps (and at the end);
    resume: continue from it. teacher: an online teacher (else targets carries the top-k).
    validation: held-out sequences; the model ends in the best-scoring state seen."""
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr, weight_decay=0.0)
    start = 0
    if resume:
        start = _load_state(checkpoint, model, optimizer, options)
    began = time.perf_counter()
    losses = []
    n = len(targets.tokens)
    kept: dict[str, torch.Tensor] = {}
    if validation is not None:
        validation.scores.append((start, heldout_kl(model, validation.targets, options.batch_size)))
        kept = {name: value.clone() for name, value in model.state_dict().items()}
    for step in range(start, options.steps):
        chosen = batch_indices(step, options.batch_size, n, options.seed)
        tokens = torch.from_numpy(targets.tokens[chosen])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, options)
        teacher_part: dict[str, torch.Tensor] = {}
        if teacher is not None:
            with torch.no_grad():
                teacher_part["teacher_logits"] = teacher(tokens)
        else:
            if targets.top_ids is None or targets.top_log_probs is None:
                raise DistillError(
                    "offline distillation needs the teacher's top-k in the targets; pass teacher= otherwise"
                )
            teacher_part["top_ids"] = torch.from_numpy(targets.top_ids[chosen]).long()
            teacher_part["top_log_probs"] = torch.from_numpy(targets.top_log_probs[chosen])
        loss, _, _ = distill_loss(
            model(tokens), tokens, alpha=options.alpha, temperature=options.temperature, **teacher_part
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, options.steps, losses[-1])
        out_of_time = options.time_limit is not None and time.perf_counter() - began > options.time_limit
        stalled = False
        if validation is not None and ((step + 1) % validation.every == 0 or step + 1 == options.steps):
            best_before = validation.best
            validation.scores.append((step + 1, heldout_kl(model, validation.targets, options.batch_size)))
            if validation.best != best_before:
                kept = {name: value.clone() for name, value in model.state_dict().items()}
            stalled = len(validation.scores) - 1 - validation.scores.index(validation.best) >= validation.patience
        if (step + 1) % options.save_every == 0 or step + 1 == options.steps or out_of_time or stalled:
            _save_state(checkpoint, model, optimizer, step + 1, options)
        if out_of_time or stalled:
            break
    if validation is not None:
        model.load_state_dict(kept)
    return losses


def _save_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, options: Options
) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "options": json.dumps(options.resumable(), sort_keys=True),
    }
    with atomic_open(path) as partial:
        torch.save(state, partial)


def _load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, options: Options) -> int:
    if not path.is_file():
        raise DistillError(f"--resume: there is no checkpoint {path} to resume from")
    try:
        state = torch.load(path, weights_only=True)  # plain tensors and numbers: loading runs no code
    except Exception as exc:
        raise DistillError(f"{path} is not a training checkpoint slim wrote ({exc.__class__.__name__})") from None
    if state.get("options") != json.dumps(options.resumable(), sort_keys=True):
        raise DistillError(
            f"{path} was written with other training options; resume with the same ones, "
            f"or start afresh without --resume ({state.get('options')})"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def summarize(
    output: Path,
    options: Options,
    losses: list[float],
    started: float,
    gguf: Path | None = None,
    validation: Validation | None = None,
) -> Summary:
    summary = Summary(
        str(output),
        len(losses),
        len(losses) * options.batch_size * options.seq_len,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        time.perf_counter() - started,
        str(gguf) if gguf else None,
        losses,
    )
    if validation is not None and validation.scores:
        summary.best_step, summary.heldout_kl_after = validation.best
        summary.heldout_kl_before = validation.scores[0][1]
    return summary


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".ckpt")


# ----------------------------------------------------------------------------- the command's job


def distill(
    teacher: str | os.PathLike[str],
    student_dir: str | os.PathLike[str],
    text: str,
    out_dir: str | os.PathLike[str],
    *,
    online: bool = False,
    mix: Mix | None = None,
    resume: bool = False,
    replace: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    teacher_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Summary:
    """Distill `teacher` into the HF checkpoint `student_dir`; write the result to `out_dir` (an HF
    folder; one already there is replaced only when `replace`) and, with a mix, a GGUF of that mix
    next to it (OUT-<type>.gguf).

    teacher: a GGUF (offline, top-k cached) or, with online=True, an HF folder. Healing a pruned
    model is the same call with the unpruned model as teacher. options: see `Options`."""
    started = time.perf_counter()
    settings = Options(**options)
    settings.check()
    teacher, student_dir, out_dir = Path(teacher), Path(student_dir), Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (replace or not any(out_dir.iterdir()))):
        raise DistillError(f"{out_dir} already exists; add --force to replace it")
    if not out_dir.parent.is_dir():
        raise DistillError(f"output's parent folder {out_dir.parent} does not exist; create it first")
    if resume and not checkpoint_path(out_dir).is_file():
        raise DistillError(f"--resume: there is no checkpoint {checkpoint_path(out_dir)} to resume from")
    if settings.threads:
        torch.set_num_threads(settings.threads)

    teacher_model = None
    if online:
        if not teacher.is_dir():
            raise DistillError(f"--online runs the teacher in torch: {teacher} must be a Hugging Face model folder")
        from slim.runtime.formats.tokenizer import read_hf_tokenizer

        check_vocabulary(student_dir, read_hf_tokenizer(teacher).tokens)
        teacher_model = student_lib.load(teacher).requires_grad_(False)
        targets = Targets(hf_tokens(teacher, text, settings.seq_len))
    else:
        if teacher.is_dir():
            raise DistillError(
                f"{teacher} is a folder: offline distillation reads a GGUF teacher "
                "(convert it with slim convert, or pass --online)"
            )
        check_vocabulary(student_dir, gguf_tokens(teacher))
        targets = teacher_targets(
            teacher,
            text,
            settings.seq_len,
            settings.top_k,
            threads=settings.threads,
            cache_dir=Path(cache_dir) if cache_dir else None,
            progress=teacher_progress,
        )

    model = student_lib.load(student_dir)
    losses = train(
        model, targets, settings, checkpoint_path(out_dir), resume=resume, teacher=teacher_model, progress=progress
    )
    student_lib.save(model, student_dir, out_dir)
    gguf_path = None
    if mix is not None:
        from slim.runtime.pipeline.convert import convert

        gguf_path = out_dir.with_name(f"{out_dir.name}-{mix.name.lower()}.gguf")
        convert(out_dir, gguf_path, mix)
    return summarize(out_dir, settings, losses, started, gguf_path)


def hf_tokens(model_dir: Path, text: str, seq_len: int) -> np.ndarray:
    """The text tokenized as slim's GGUF of this HF model would tokenize it, cut into seq_len
    windows: llama.cpp reads the tokenizer from a vocabulary-only GGUF written for the purpose."""
    import gguf

    from slim import models
    from slim.runtime.formats.checkpoint import Checkpoint
    from slim.runtime.formats.gguf_file import add_metadata_value
    from slim.runtime.formats.tokenizer import read_hf_tokenizer, write_to_gguf

    arch = models.for_hf_config(Checkpoint(model_dir).config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.gguf"
        writer = gguf.GGUFWriter(path, arch.gguf_arch)
        for key, value in arch.metadata().items():
            add_metadata_value(writer, key, value)
        write_to_gguf(read_hf_tokenizer(model_dir), writer, vocab_size=arch.vocab_size)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        tokens, bos = _vocab_only_tokenize(path, text)
    chunks = chunk_tokens(tokens, seq_len, bos)
    if not chunks:
        raise DistillError(f"the text is {len(tokens)} tokens, shorter than one sequence of {seq_len}")
    return np.array(chunks, dtype=np.int64)


def _vocab_only_tokenize(path: Path, text: str) -> tuple[list[int], int | None]:
    from slim.runtime.inference import llama_bindings

    L = llama_bindings()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise DistillError("llama.cpp could not read the teacher's tokenizer")
    try:
        vocab = L.llama_model_get_vocab(model)
        data = text.encode()
        buffer = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(vocab, data, len(data), buffer, len(buffer), True, False)
        bos = int(L.llama_vocab_bos(vocab)) if L.llama_vocab_get_add_bos(vocab) else None
        return list(buffer[:n]), bos
    finally:
        L.llama_model_free(model)
