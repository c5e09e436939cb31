"""Property-based fuzzing of the two file readers that face untrusted files first: check_gguf (every GGUF
before llama.cpp sees it) and the safetensors header reader (every checkpoint before convert).

    python benchmarks/fuzz_files.py [--examples 100000] [--target gguf|safetensors|both]

Hypothesis builds files near the valid ones (real layouts whose counts, lengths, types, offsets and
shapes lie, then bytes flipped or cut) and checks one property per input: the reader returns, or
raises its own error (GGUFError, CheckpointError) with a one-line message; never another exception,
and never more than two seconds on one file (a hang). Prints the inputs tried, how many each reader
accepted and refused, and the time. tests/test_hostile_fuzz.py runs a few hundred of each.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slim.runtime.formats.checkpoint import Checkpoint, CheckpointError
from slim.runtime.formats.gguf_file import GGUFError, check_gguf

# Hypothesis draws one seeded random source per input (replayable from its seed), from which the file is built:
# drawing each field through its own strategy costs 25 ms an input, this about 1 ms.
RANDOMS = st.randoms(use_true_random=True)


def u64(r: random.Random) -> int:
    """A count, length or offset: mostly small, sometimes anything, sometimes an edge."""
    pick = r.random()
    if pick < 0.6:
        return r.randint(0, 64)
    if pick < 0.8:
        return r.choice([2**31, 2**32, 2**63, 2**64 - 1, 10**8])
    return r.getrandbits(64)


def lie(r: random.Random, truth: int, often: float = 0.1) -> int:
    return u64(r) if r.random() < often else truth


# ---- GGUF --------------------------------------------------------------------------------------

KEYS = [
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.context_length",
    "llama.attention.head_count",
    "llama.expert_count",
    "llama.expert_used_count",
    "llama.expert_group_count",
    "llama.nextn_predict_layers",
    "llama.rope.scaling.type",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
]
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
TOKENS = [b"a", b"b", b"", b"a\0b", b"\0", b"[EMPTY_1]", b"\xff", b"ab"]


def gguf_string(r: random.Random, text: bytes) -> bytes:
    return struct.pack("<Q", lie(r, len(text), 0.05)) + text


def scalar(r: random.Random, vtype: int) -> bytes:
    fmt = SCALAR_FORMATS[vtype]
    if r.random() < 0.5:
        return struct.pack(fmt, r.choice([0, 1, 2, 4, 32, 127]))
    return r.randbytes(struct.calcsize(fmt))


def gguf_value(r: random.Random, key: str) -> bytes:
    if key == "general.architecture" and r.random() < 0.7:
        return struct.pack("<IQ", 8, 5) + b"llama"
    vtype = r.choice([4, 4, 5, 8, 9, 9, 0, 6, 10, 12, 7, 13, 2**32 - 1])
    head = struct.pack("<I", vtype)
    if vtype == 4 and r.random() < 0.5:
        return head + struct.pack("<I", r.choice([0, 1, 2, 4, 32, 512, 513, 1024, 1025, 2**31]))
    if vtype in SCALAR_FORMATS:
        return head + scalar(r, vtype)
    if vtype == 8:
        return head + gguf_string(r, r.choice([b"llama", b"yarn", b"wild", r.randbytes(r.randint(0, 12))]))
    if vtype == 9:
        etype = r.choice([8, 8, 0, 5, 6, 9, 4, 2**31])
        items = [r.choice(TOKENS) for _ in range(r.randint(0, 8))]
        body = b""
        if etype == 8:
            body = b"".join(gguf_string(r, item) for item in items)
        elif etype in SCALAR_FORMATS:
            body = b"".join(scalar(r, etype) for _ in items)
        return head + struct.pack("<IQ", etype, lie(r, len(items))) + body
    return head + r.randbytes(r.randint(0, 16))


def gguf_file(r: random.Random) -> bytes:
    version = r.choice([3, 3, 3, 2, 1, 4, 3 << 24])
    keys = [r.choice(KEYS) if r.random() < 0.8 else r.randbytes(r.randint(0, 8)).decode("latin-1") for _ in range(10)]
    keys = keys[: r.randint(0, 10)]
    kv = b"".join(gguf_string(r, key.encode()) + gguf_value(r, key) for key in keys)
    infos, offset = [], 0
    for _ in range(r.randint(0, 4)):
        name = r.choice([b"w", b"v", b"blk.0.attn_q.weight", b"n" * 64, b"", b"\xff\xfe"])
        dims = [r.choice([1, 2, 32, 256]) if r.random() < 0.8 else u64(r) for _ in range(r.randint(0, 5))]
        ttype = r.choice([0, 0, 1, 2, 8, 12, 14, 30, 36, 41, 42, 2**32 - 1])
        head = gguf_string(r, name) + struct.pack("<I", lie(r, len(dims)) % 2**32)
        infos.append(head + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, lie(r, offset)))
        offset += 128
    header = struct.pack("<IQQ", version, lie(r, len(infos)), lie(r, len(keys)))
    data = b"GGUF" + header + kv + b"".join(infos)
    data += b"\0" * (-len(data) % 32) + r.randbytes(r.randint(0, 64)) + b"\0" * r.choice([0, offset, 4 * offset])
    if r.random() < 0.5:  # damage: flip bytes, then maybe cut the file
        buffer = bytearray(data)
        for _ in range(r.randint(0, 4)):
            buffer[r.randrange(len(buffer))] = r.randrange(256)
        data = bytes(buffer[: r.randint(0, len(buffer))] if r.random() < 0.5 else buffer)
    return data


# ---- safetensors -------------------------------------------------------------------------------


def json_value(r: random.Random, depth: int = 0) -> Any:
    pick = r.randrange(8 if depth < 3 else 5)
    if pick == 0:
        return None
    if pick == 1:
        return r.random() < 0.5
    if pick == 2:
        return count(r)
    if pick == 3:
        return r.choice([1.5, -0.0, 1e308, 2.0])
    if pick == 4:
        return r.choice(["", "F32", "x", "\ud800"])
    if pick in (5, 6):
        return [json_value(r, depth + 1) for _ in range(r.randint(0, 3))]
    return {r.choice(["w", "dtype", "shape", "data_offsets"]): json_value(r, depth + 1) for _ in range(r.randint(0, 3))}


def count(r: random.Random) -> int:
    pick = r.random()
    if pick < 0.7:
        return r.randint(0, 16)
    if pick < 0.85:
        return r.choice([2**32, 2**63, 2**64, -1, -8])
    return r.randint(-(2**64), 2**64)


def safetensors_entry(r: random.Random, begin: int) -> Any:
    if r.random() < 0.1:
        return json_value(r)
    dtype = r.choice(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "F8_E4M3", "X", 7])
    shape = [count(r) for _ in range(r.randint(0, 3))] if r.random() < 0.9 else json_value(r)
    dims = shape if isinstance(shape, list) and all(type(n) is int for n in shape) else []
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(str(dtype), 1) * math.prod(dims)
    offsets = [begin, begin + size] if r.random() < 0.7 else [count(r) for _ in range(r.choice([2, 2, 1, 3]))]
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def safetensors_file(r: random.Random) -> bytes:
    if r.random() < 0.1:
        header: Any = json_value(r)
    else:
        header, begin = {}, 0
        for name in r.sample(["w", "v", "u", "__metadata__"], r.randint(0, 4)):
            entry = header[name] = safetensors_entry(r, begin)
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (
                isinstance(offsets, list)
                and len(offsets) == 2
                and isinstance(offsets[1], int)
                and 0 <= offsets[1] < 4096
            ):
                begin = offsets[1]
    blob = json.dumps(header).encode()
    if r.random() < 0.05:
        blob = blob.replace(b"[", b"[" * r.randint(1, 3000), 1)  # deep nesting
    length = lie(r, len(blob), 0.15)
    return struct.pack("<Q", length) + blob + r.randbytes(r.randint(0, 160))


# ---- the properties ----------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.accepted = self.refused = 0


def one_line(error: Exception) -> None:
    assert "\n" not in str(error) and str(error), repr(error)


def fuzz_gguf(examples: int, folder: Path) -> Tally:
    tally = Tally()
    path = folder / "fuzz.gguf"

    @settings(**_settings(examples))
    @given(RANDOMS)
    def check(r: random.Random) -> None:
        path.write_bytes(gguf_file(r))
        try:
            check_gguf(path)
            tally.accepted += 1
        except GGUFError as error:
            one_line(error)
            tally.refused += 1

    check()
    return tally


def fuzz_safetensors(examples: int, folder: Path) -> Tally:
    tally = Tally()
    (folder / "config.json").write_text("{}")
    path = folder / "model.safetensors"

    @settings(**_settings(examples))
    @given(RANDOMS)
    def check(r: random.Random) -> None:
        path.write_bytes(safetensors_file(r))
        try:
            for tensor in Checkpoint(folder):
                tensor.load()
            tally.accepted += 1
        except CheckpointError as error:
            one_line(error)
            tally.refused += 1

    check()
    return tally


def _settings(examples: int) -> dict[str, Any]:
    return dict(
        max_examples=examples,
        deadline=timedelta(seconds=2),  # a hang fails the run
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--target", choices=["gguf", "safetensors", "both"], default="both")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # float64 noise overflowing float32 as a tensor loads: expected
    targets = {"gguf": fuzz_gguf, "safetensors": fuzz_safetensors}
    for name, fuzz in targets.items():
        if args.target not in (name, "both"):
            continue
        with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as folder:
            started = time.perf_counter()
            tally = fuzz(args.examples, Path(folder))
            seconds = time.perf_counter() - started
        total = tally.accepted + tally.refused
        print(
            f"{name}: {total} inputs, {tally.accepted} accepted, {tally.refused} refused with one line, "
            f"no other exception, none over 2 s; {seconds:.0f} s ({total / seconds:.0f} inputs/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
