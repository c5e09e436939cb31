"""slim calibrate: what a model's matmuls see on real text, measured while llama.cpp runs it.

For every matmul weight W (y = W x) the pass sums x_j^2 per input column j over the calibration
tokens: the diagonal of X^T X. Divided by the token count it is llama.cpp's importance matrix
(E[x_j^2], which importance-weighted quantization uses); its square root is Wanda's column norm
||X_j||_2 (slim prune). One pass serves both. With hidden_states=True the pass also measures how
much each block turns the residual stream: the mean cosine similarity between the hidden states
entering and leaving every span of blocks (slim prune --method layers).

The text is cut and evaluated as llama-imatrix does at its default batch sizes (chunks of `ctx`
tokens, the first replaced by BOS when the model adds one, every position computed, several chunks
side by side per llama_decode), and the statistics are read from llama.cpp's own graph through its
eval callback, so the counts and chunk count equal llama-imatrix's and the sums match to float
rounding; they are written in its GGUF format.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from slim.runtime.files import atomic_path

IMATRIX_TYPE = gguf.GGUFType.IMATRIX
_IMATRIX_KEYS = gguf.Keys.IMatrix
# llama-imatrix skips matmuls over fewer rows than this (warm-up and single-token batches)
_MIN_ROWS = 16
# llama-imatrix's defaults (-b 2048, -ub 512): how many tokens one llama_decode and one compute pass take
IMATRIX_BATCH, IMATRIX_UBATCH = 2048, 512


class CalibrationError(ValueError):
    """Calibration that cannot go ahead; the message says what to do."""


class _GgmlTensor(ctypes.Structure):
    """The head of ggml.h's struct ggml_tensor, as far as the fields read here."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def _rows(t: _GgmlTensor) -> np.ndarray:
    """A float32 tensor's rows as a (rows, ne0) view of its host memory (strides honoured)."""
    ne0, ne1, ne2, ne3 = (int(n) for n in t.ne)
    nb = [int(n) for n in t.nb]
    n_floats = (nb[1] * (ne1 - 1) + nb[2] * (ne2 - 1) + nb[3] * (ne3 - 1)) // 4 + ne0
    base = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(n_floats,))
    view = np.lib.stride_tricks.as_strided(base, shape=(ne3, ne2, ne1, ne0), strides=(nb[3], nb[2], nb[1], 4))
    return view.reshape(-1, ne0)


def _int32_matrix(t: _GgmlTensor) -> np.ndarray:
    """An I32 2-D tensor (ne0 columns, ne1 rows; strides honoured, as a view may have) as (ne1, ne0)."""
    ne0, ne1 = int(t.ne[0]), int(t.ne[1])
    nb0, nb1 = int(t.nb[0]), int(t.nb[1])
    n_ints = (nb1 * (ne1 - 1) + nb0 * (ne0 - 1)) // 4 + 1
    base = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_int32)), shape=(n_ints,))
    return np.lib.stride_tricks.as_strided(base, shape=(ne1, ne0), strides=(nb1, nb0)).copy()


@dataclass
class Calibration:
    """Per-matmul-weight activation statistics (GGUF weight names), plus the optional hidden-state
    similarities. `sums[name]` is float64 (n_in,), sum over tokens of x_j^2; `counts[name]` tokens.

    A mixture of experts' stacked weights (ffn_*_exps) keep one row per expert, as llama-imatrix does:
    `expert_sums[name]` (n_expert, n_in) over the tokens routed to each expert, `expert_counts[name]`
    (n_expert,) how many were. The counts of a layer's ffn_gate_exps are its routing statistics."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 0
    chunk_count: int = 0
    datasets: list[str] = field(default_factory=list)
    hidden_cosine: np.ndarray | None = None  # (n_layer + 1, n_layer + 1), see calibrate()
    expert_sums: dict[str, np.ndarray] = field(default_factory=dict)
    expert_counts: dict[str, np.ndarray] = field(default_factory=dict)
    #: Per layer, the routing weight each expert received, summed over the tokens (calibrate(routing=True));
    #: not part of llama.cpp's file format, so a loaded matrix has none.
    expert_mass: dict[int, np.ndarray] = field(default_factory=dict)

    def mean_squares(self, name: str) -> np.ndarray:
        """E[x_j^2] for weight `name` as llama-quantize computes it from the file: float32
        sum / float32 count, and 1 where nothing was counted (an expert no token chose). This is the
        importance the quantizer weighs errors with: (n_in,), or (n_expert, n_in) for experts."""
        if name in self.expert_sums:
            sums = self.expert_sums[name].astype(np.float32)
            counts = self.expert_counts[name].astype(np.float32)[:, None]
        else:
            sums, counts = self.sums[name].astype(np.float32), np.array(self.counts[name], dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(counts > 0, sums / counts, np.float32(1)).astype(np.float32)

    def covers(self, name: str) -> bool:
        return name in self.sums or name in self.expert_sums

    def columns(self, name: str) -> int:
        """The row length of the weight whose statistics `name` holds."""
        return int((self.expert_sums[name] if name in self.expert_sums else self.sums[name]).shape[-1])

    def routing(self) -> dict[int, np.ndarray]:
        """Per layer, the share of routing choices each expert got (the counts of its ffn_gate_exps
        over their sum): the routing statistics of the calibration text."""
        found = {}
        for name, counts in self.expert_counts.items():
            if name.endswith(".ffn_gate_exps.weight") and counts.sum() > 0:
                found[int(name.split(".")[1])] = counts / counts.sum()
        return dict(sorted(found.items()))

    def check_fits(self, columns: dict[str, int], source: str) -> None:
        """Refuse statistics whose length is not the column count of the weight of the same name (GGUF names)."""
        for name in [*self.sums, *self.expert_sums]:
            if name in columns and self.columns(name) != columns[name]:
                raise CalibrationError(
                    f"the importance matrix has {self.columns(name)} columns for {name}, which has {columns[name]} in "
                    f"{source}; was it made from this model?"
                )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write llama.cpp's imatrix GGUF (llama-quantize --imatrix reads it), atomically."""
        with atomic_path(path) as partial:
            writer = gguf.GGUFWriter(partial, arch=IMATRIX_TYPE)
            writer.add_type(IMATRIX_TYPE)
            # llama.cpp needs the key to be present; gguf-py leaves an empty array out
            writer.add_array(_IMATRIX_KEYS.DATASETS, self.datasets or ["unnamed"])
            writer.add_uint32(_IMATRIX_KEYS.CHUNK_COUNT, self.chunk_count)
            writer.add_uint32(_IMATRIX_KEYS.CHUNK_SIZE, self.chunk_size)
            for name in sorted([*self.sums, *self.expert_sums]):
                if name in self.expert_sums:  # one row of sums and one count per expert
                    sums, counts = self.expert_sums[name], self.expert_counts[name]
                else:
                    sums, counts = self.sums[name].reshape(1, -1), np.array([self.counts[name]])
                writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
                writer.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read an imatrix GGUF written by slim calibrate or llama-imatrix, checked: the header as check_gguf
        checks a model's, every sum finite and non-negative, every count a finite non-negative number, and
        each weight's statistics one row of sums with one count."""
        from slim.runtime.formats.gguf_file import GGUFError, check_gguf

        try:
            check_gguf(path)
            reader = gguf.GGUFReader(path)
        except GGUFError as exc:
            raise CalibrationError(f"{exc}; make the importance matrix again with `slim calibrate`") from None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path} is not an imatrix GGUF ({exc})") from None

        def scalar(key: str) -> Any:
            f = reader.fields.get(key)
            return None if f is None else f.contents()

        kind = scalar(gguf.Keys.General.TYPE)
        if kind != IMATRIX_TYPE:
            raise CalibrationError(
                f"{path} is a GGUF but not an importance matrix ({gguf.Keys.General.TYPE} is "
                f"{kind!r}); make one with `slim calibrate`"
            )
        chunk_size, chunk_count = scalar(_IMATRIX_KEYS.CHUNK_SIZE) or 0, scalar(_IMATRIX_KEYS.CHUNK_COUNT) or 0
        datasets = scalar(_IMATRIX_KEYS.DATASETS) or []
        for key, value in ((_IMATRIX_KEYS.CHUNK_SIZE, chunk_size), (_IMATRIX_KEYS.CHUNK_COUNT, chunk_count)):
            if not isinstance(value, int) or value < 0:
                raise CalibrationError(f"{path} is damaged: {key} is {value!r}; make it again with `slim calibrate`")
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            datasets = []
        tensors = {t.name: t for t in reader.tensors}
        cal = cls(chunk_size=chunk_size, chunk_count=chunk_count, datasets=datasets)
        for key in tensors:
            if key.endswith(".counts") and key[: -len(".counts")] + ".in_sum2" not in tensors:
                raise CalibrationError(f"{path} is damaged: {key} has no matching .in_sum2 sums")
            if not key.endswith(".in_sum2"):
                continue
            name = key[: -len(".in_sum2")]
            counts = tensors.get(f"{name}.counts")
            sums = tensors[key]
            # one row of sums per count: a dense weight has one, a stack of experts one per expert
            rows = int(counts.n_elements) if counts is not None else 0
            if counts is None or rows == 0 or int(counts.shape[0]) != 1:
                raise CalibrationError(f"{path} is damaged: {name} has no token counts")
            if sums.n_elements == 0 or sums.n_elements % rows or int(sums.n_elements) != int(sums.shape[0]) * rows:
                raise CalibrationError(
                    f"{path} is damaged: {key} has shape {[int(n) for n in sums.shape]} where {rows} row(s) of sums "
                    "belong (one per count)"
                )
            values = np.asarray(sums.data, dtype=np.float64).reshape(rows, -1)
            count = np.asarray(counts.data, dtype=np.float64).reshape(-1)
            if not np.isfinite(values).all() or (values < 0).any():
                raise CalibrationError(
                    f"{path} is damaged: {key} holds negative or non-finite sums of squares; "
                    "make the importance matrix again with `slim calibrate`"
                )
            bad = ~np.isfinite(count) | (count < 0) | (count != np.round(count))
            if bad.any():
                raise CalibrationError(
                    f"{path} is damaged: {name}.counts is {count[bad][0]:g}, not a token count; "
                    "make the importance matrix again with `slim calibrate`"
                )
            if rows == 1:
                cal.sums[name], cal.counts[name] = values[0], int(count[0])
            else:
                cal.expert_sums[name], cal.expert_counts[name] = values, count.astype(np.int64)
        return cal


class _Collector:
    """The eval callback: asks llama.cpp for each weight matmul (and, optionally, each block's
    output), and accumulates their statistics."""

    def __init__(self, n_layer: int, hidden_states: bool, include_output: bool, routing: bool = False) -> None:
        from slim.kernels import ggml

        lib = ggml.library()
        if lib is None:
            raise CalibrationError("calibration runs the model in llama.cpp: install llama-cpp-python")
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        names = {}
        for op in range(256):
            name = lib.ggml_op_name(op)
            if name in (b"MUL_MAT", b"MUL_MAT_ID"):
                names[name] = op
            if name == b"MUL_MAT_ID":
                break
        self._mul_mat, self._mul_mat_id = names[b"MUL_MAT"], names[b"MUL_MAT_ID"]
        self.n_layer = n_layer
        self.hidden_states = hidden_states
        self.include_output = include_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.expert_sums: dict[str, np.ndarray] = {}
        self.expert_counts: dict[str, np.ndarray] = {}
        self.routing = routing
        self.expert_mass: dict[int, np.ndarray] = {}
        # a layer's chosen experts (from its ffn_gate_exps matmul) and their weights, until both are seen
        self._chosen: dict[int, np.ndarray] = {}
        self._weights: dict[int, np.ndarray] = {}
        self.cosine_sum = np.zeros((n_layer + 1, n_layer + 1))
        self.cosine_tokens = 0
        self._hidden: dict[int, list[np.ndarray]] = {}  # per hidden state, its rows of each compute pass
        self.error: str | None = None

    def weight_name(self, t: _GgmlTensor) -> str | None:
        if t.op not in (self._mul_mat, self._mul_mat_id) or not t.src[0] or not t.src[1]:
            return None
        weight = _GgmlTensor.from_address(t.src[0])
        name = weight.name.decode(errors="replace")
        if not (name.startswith("blk.") or (self.include_output and name == "output.weight")):
            return None
        return name

    def routing_layer(self, t: _GgmlTensor) -> int | None:
        """The layer of a mixture's normalised routing weights (llama.cpp's ffn_moe_weights_norm-N)."""
        prefix = b"ffn_moe_weights_norm-"
        layer = t.name[len(prefix) :]
        return int(layer) if self.routing and t.name.startswith(prefix) and layer.isdigit() else None

    def hidden_index(self, t: _GgmlTensor) -> int | None:
        """0 for the token embeddings entering block 0, i + 1 for block i's output."""
        name = t.name
        if name in (b"inp_embd", b"embd"):  # the name differs between llama.cpp versions
            return 0
        if name.startswith(b"l_out-"):
            return int(name[6:]) + 1
        return None

    def __call__(self, address: int, ask: bool, user_data: Any) -> bool:
        try:
            t = _GgmlTensor.from_address(address)
            name = self.weight_name(t)
            if ask:
                if name is not None:
                    if t.op == self._mul_mat_id:  # llama-imatrix takes every experts' matmul, however few rows
                        return True
                    src1 = _GgmlTensor.from_address(t.src[1])
                    return src1.ne[1] >= _MIN_ROWS and src1.type == gguf.GGMLQuantizationType.F32
                if self.routing_layer(t) is not None:
                    return True
                return self.hidden_states and self.hidden_index(t) is not None
            if name is not None and t.op == self._mul_mat_id:
                self.add_experts(name, t)
            elif (layer := self.routing_layer(t)) is not None:
                # per token its chosen experts' weights, choices innermost: [n_used, n_tokens] or [1, n_used, n_tokens]
                self._weights[layer] = _rows(t).reshape(-1).astype(np.float64)
                self.add_mass(layer)
            elif name is not None:
                x = _rows(_GgmlTensor.from_address(t.src[1])).astype(np.float64)
                acc = self.sums.get(name)
                squares = np.einsum("ij,ij->j", x, x)
                self.sums[name] = squares if acc is None else acc + squares
                self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            else:
                index = self.hidden_index(t)
                if index is not None and t.type == gguf.GGMLQuantizationType.F32:
                    self._hidden.setdefault(index, []).append(_rows(t).astype(np.float64))
            return True
        except Exception as exc:  # an exception must not unwind through C
            self.error = f"calibration callback failed: {exc!r}"
            return False

    def add_experts(self, name: str, t: _GgmlTensor) -> None:
        """One MUL_MAT_ID: src1 holds, per token, the input of each chosen expert (one row shared by all
        of them, or one row each), src[2] the chosen experts' ids; each row's squares go to its expert,
        as llama-imatrix adds them."""
        weight, src1 = _GgmlTensor.from_address(t.src[0]), _GgmlTensor.from_address(t.src[1])
        ids_tensor = _GgmlTensor.from_address(t.src[2])
        n_as, ne0, ne1, n_tokens = int(weight.ne[2]), int(src1.ne[0]), int(src1.ne[1]), int(src1.ne[2])
        x = _rows(src1).reshape(n_tokens, ne1, ne0)
        ids = _int32_matrix(ids_tensor)  # (n_tokens, n_used)
        if name not in self.expert_sums:
            self.expert_sums[name] = np.zeros((n_as, ne0))
            self.expert_counts[name] = np.zeros(n_as, dtype=np.int64)
        sums, counts = self.expert_sums[name], self.expert_counts[name]
        for slot in range(ids.shape[1]):
            rows = x[:, slot % ne1, :].astype(np.float64)
            np.add.at(sums, ids[:, slot], rows * rows)
            counts += np.bincount(ids[:, slot], minlength=n_as)
        if self.routing and name.endswith(".ffn_gate_exps.weight"):
            layer = int(name.split(".")[1])
            self._chosen[layer] = ids
            self.add_mass(layer, n_as)

    def add_mass(self, layer: int, n_expert: int = 0) -> None:
        """Add each expert's routing weight, once a layer's choices and weights are both in (llama.cpp
        may compute either first)."""
        if layer not in self._chosen or layer not in self._weights:
            return
        chosen, weights = self._chosen.pop(layer), self._weights.pop(layer)
        if layer not in self.expert_mass:
            n = n_expert or int(self.expert_counts[f"blk.{layer}.ffn_gate_exps.weight"].shape[0])
            self.expert_mass[layer] = np.zeros(n)
        np.add.at(self.expert_mass[layer], chosen.reshape(-1), weights)

    def end_batch(self) -> None:
        """Fold the block outputs of the last batch into the cosine matrix."""
        if not self.hidden_states:
            return
        if len(self._hidden) != self.n_layer + 1:
            missing = sorted(set(range(self.n_layer + 1)) - set(self._hidden))
            raise CalibrationError(
                f"llama.cpp did not expose the hidden states {missing}; "
                "this architecture's graph names them differently"
            )
        h = np.stack([np.concatenate(self._hidden[i]) for i in range(self.n_layer + 1)])  # (L+1, T, E)
        h /= np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
        self.cosine_sum += np.einsum("ate,bte->ab", h, h)
        self.cosine_tokens += h.shape[1]
        self._hidden.clear()


def calibrate(
    model: str | os.PathLike[str],
    text: str,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    hidden_states: bool = False,
    include_output: bool = False,
    routing: bool = False,
    dataset: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Run a GGUF over `text` in chunks of `ctx` tokens and collect its activation statistics.

    chunks limits how many chunks are used (default all). hidden_states adds `hidden_cosine`:
    C[a, b] = mean over tokens of cos(h_a, h_b), h_0 the input of block 0 and h_i the output of
    block i - 1, so removing blocks i..i+k-1 turns the stream by arccos(C[i, i + k]).
    include_output also collects output.weight (llama-imatrix --process-output). routing adds
    `expert_mass` for a mixture of experts: per layer, the routing weight each expert received.
    """
    from slim.runtime import inference
    from slim.runtime.formats.gguf_file import check_gguf
    from slim.runtime.inference.evaluate import chunk_tokens

    if ctx < _MIN_ROWS:
        raise CalibrationError(f"--ctx must be at least {_MIN_ROWS} tokens, got {ctx}")
    if chunks is not None and chunks < 1:
        raise CalibrationError(f"--chunks must be at least 1, got {chunks}")
    L = inference.llama_bindings()
    metadata = check_gguf(Path(model))
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE, "")
    n_layer = int(metadata.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), 0))
    collector = _Collector(n_layer, hidden_states, include_output, routing)
    callback = L.ggml_backend_sched_eval_callback(collector)
    # llama-imatrix's layout: n_seq chunks side by side in one llama_decode, each its own sequence,
    # computed IMATRIX_UBATCH tokens at a time, which llama.cpp splits evenly across the sequences.
    # The same layout gives the same statistics, including a quirk: when the last group holds fewer
    # than n_seq chunks and the micro-batch does not divide evenly among them, its final compute pass
    # is under _MIN_ROWS rows and is skipped (51 chunks of 512: the last 3 lose 2 tokens each).
    n_seq = max(1, IMATRIX_BATCH // ctx)
    n_batch = min(IMATRIX_BATCH, n_seq * ctx)
    llm = inference.load(
        model,
        n_ctx=n_seq * ctx,
        n_batch=n_batch,
        n_ubatch=min(IMATRIX_UBATCH, n_batch),
        n_seq_max=n_seq,
        n_threads=threads,
        eval_callback=callback,
    )
    batch = inference.Batch(n_batch)
    try:
        tokens = llm.tokenize(text, add_special=True, parse_special=False)
        pieces = chunk_tokens(tokens, ctx, llm.prompt_bos)
        if not pieces:
            raise CalibrationError(
                f"the calibration text is {len(tokens)} tokens, shorter than one "
                f"chunk of --ctx {ctx}; give a longer text or a smaller --ctx"
            )
        pieces = pieces[:chunks] if chunks else pieces
        for first in range(0, len(pieces), n_seq):
            group = pieces[first : first + n_seq]
            llm.clear_cache()
            for start in range(0, ctx, n_batch):  # one pass unless ctx is larger than a batch
                batch.clear()
                for seq, piece in enumerate(group):
                    for pos in range(start, min(start + n_batch, ctx)):
                        batch.add(piece[pos], pos, seq, True)  # every row's output: output.weight sees them all
                try:
                    llm.decode(batch)
                except inference.EngineError as exc:
                    raise CalibrationError(collector.error or str(exc)) from None
                if collector.error:
                    raise CalibrationError(collector.error)
            collector.end_batch()
            if progress:
                progress(first + len(group), len(pieces))
    finally:
        batch.free()
        llm.close()
    if not collector.sums:
        raise CalibrationError(f"llama.cpp ran no weight matmuls that could be observed in {model}")
    return Calibration(
        sums=collector.sums,
        counts=collector.counts,
        expert_sums=collector.expert_sums,
        expert_counts=collector.expert_counts,
        expert_mass=collector.expert_mass,
        chunk_size=ctx,
        chunk_count=max(collector.counts.values()) // ctx,  # as llama-imatrix counts: whole chunks seen
        datasets=[dataset] if dataset else [],
        hidden_cosine=collector.cosine_sum / collector.cosine_tokens if hidden_states else None,
    )
