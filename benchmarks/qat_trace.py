"""QAT's trajectory on the real model: the held-out KL at every --eval-every steps, in and out of
the training domain, to choose the step count and the learning rate before a full `distill.py
--part qat` run (which scores only the state kept, with llama.cpp).

    python benchmarks/qat_trace.py --train-chars 300000 --steps 100 --lr 2e-4 --eval-every 8

Same set-up as `distill.py --part qat` (it reuses its work folder: run `--part qat` once first, or
let this prepare the export, the F16 teacher and the imatrix): Q4_K_M from the imatrix and the
thorough search, alpha 1, the last tenth of the Wikipedia text held out. At each score it prints
one JSON line: the top-32 KL to the teacher (tail bucket included, as training measures it) on at
most --max-held of the held-out Wikipedia sequences, and on --diag-seqs sequences of
tiny-shakespeare taken from character 200,000 on, a slice `distill.py` never scores. No early
stop: the run goes all --steps, so the whole curve is seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slim.runtime.store import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/bench-distill"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-chars", type=int, default=300_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-held", type=int, default=10)
    parser.add_argument("--diag-seqs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args()

    import torch

    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.calibrate import calibrate
    from slim.runtime.pipeline.convert import load_imatrix
    from slim.runtime.train import distill as distill_lib
    from slim.runtime.train import qat as qat_lib
    from slim.runtime.train import student as student_lib

    sys.path.insert(0, str(Path(__file__).parent))
    from distill import prepare

    data = prepare(args.work, args.threads)
    imatrix = args.work / "imatrix.gguf"
    if not imatrix.exists():  # as distill.py --part qat makes it
        calibrate(data["f16"], data["train"][:200_000], ctx=512, chunks=12, threads=args.threads).save(imatrix)
    started = time.perf_counter()

    def targets_of(text: str, limit: int | None = None) -> distill_lib.Targets:
        found = distill_lib.teacher_targets(
            data["f16"], text, args.seq_len, 32, threads=args.threads, cache_dir=args.work / "cache"
        )
        assert found.top_ids is not None and found.top_log_probs is not None
        rows = slice(0, limit)
        return distill_lib.Targets(found.tokens[rows], found.top_ids[rows], found.top_log_probs[rows])

    training, held = distill_lib.split_heldout(targets_of(data["train"][: args.train_chars]), 0.1)
    assert held.top_ids is not None and held.top_log_probs is not None
    rows = slice(0, args.max_held)
    held = distill_lib.Targets(held.tokens[rows], held.top_ids[rows], held.top_log_probs[rows])
    shakespeare = assets.fetch("tiny-shakespeare.txt").read_text(encoding="utf-8")
    start = 200_000
    diagnostic = targets_of(shakespeare[start : start + args.diag_seqs * args.seq_len * 5], args.diag_seqs)
    print(f"teacher top-k: {time.perf_counter() - started:.0f} s", flush=True)

    torch.set_num_threads(args.threads)
    model = student_lib.load(data["hf"])
    plan = qat_lib.type_plan(model, mix("Q4_K_M"), has_imatrix=True)
    qat_lib.attach_grids(model, plan, load_imatrix(imatrix), "thorough")
    print(f"grids attached: {time.perf_counter() - started:.0f} s", flush=True)

    # distill.train scores the held-out part through distill_lib.heldout_kl; wrapped, each of its
    # scores also scores the Shakespeare slice, so both curves come from the same states.
    score = distill_lib.heldout_kl
    step = 0
    began = time.perf_counter()
    lines = []

    def traced(model: torch.nn.Module, targets: distill_lib.Targets, batch_size: int) -> float:
        kl = score(model, targets, batch_size)
        row = {
            "step": step,
            "wiki_kl": kl,
            "shakespeare_kl": score(model, diagnostic, batch_size),
            "seconds": round(time.perf_counter() - began, 1),
        }
        lines.append(json.dumps(row))
        print(lines[-1], flush=True)
        if args.out is not None:
            args.out.write_text("\n".join(lines) + "\n")
        return kl

    def progress(done: int, total: int, loss: float) -> None:
        nonlocal step
        step = done
        print(f"step {done}/{total} loss {loss:.4f} at {time.perf_counter() - began:.0f} s", flush=True)

    distill_lib.heldout_kl = traced
    options = distill_lib.Options(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        alpha=1.0,
        threads=args.threads,
        save_every=args.steps,
    )
    validation = distill_lib.Validation(held, args.eval_every, patience=args.steps + 1)
    distill_lib.train(model, training, options, args.work / "trace.ckpt", progress=progress, validation=validation)
    (args.work / "trace.ckpt").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
