"""Distillation and QAT on the real model (SmolLM2-135M-Instruct), measured on held-out text.

    python benchmarks/distill.py --part heal    # prune 4 blocks, heal by self-distillation, perplexities
    python benchmarks/distill.py --part qat     # Q4_K_M: post-training vs QAT, in and out of domain
    python benchmarks/distill.py --part report  # the table for benchmarks/RESULTS.md

The two long parts can run at the same time (each writes its results to WORK/<part>.json). The
teacher of both is the F16 GGUF of the model (its HF export, converted). Training text: the
Wikipedia "train" split; evaluation: the first --eval-chunks chunks of 512 tokens of the "test"
split (never trained on). Healing removes the 4 consecutive blocks slim prune --method layers
picks (smallest angular distance between their input and output) and heals for --heal-minutes of
wall-clock time, the teacher's top-k pass included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from slim.runtime.store import assets


def prepare(work: Path, threads: int) -> dict:
    """The HF export of the real model, its F16 GGUF (teacher and reference) and the texts."""
    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.pipeline.export import export

    work.mkdir(parents=True, exist_ok=True)
    hf, f16 = work / "smollm2-hf", work / "smollm2-f16.gguf"
    if not hf.exists():
        export(assets.fetch("smollm2-135m-instruct-q4_1.gguf"), hf, "F32")
    if not f16.exists():
        convert(hf, f16, mix("F16"), threads=threads)
    return {
        "hf": hf,
        "f16": f16,
        "train": assets.wiki_text("train").read_text(encoding="utf-8"),
        "test": assets.wiki_text("test").read_text(encoding="utf-8"),
    }


def held_out(text: str, chunks: int) -> str:
    """About `chunks` chunks of 512 tokens (4 characters a token, with margin)."""
    return text[: chunks * 512 * 5]


def score(model: Path, text: str, threads: int, reference: Path | None = None) -> dict:
    from slim.runtime.inference.evaluate import evaluate

    report, _ = evaluate(model, text, n_ctx=512, reference=reference, n_threads=threads)
    row = {
        "model": model.name,
        "size_mb": report.size_bytes / 1e6,
        "ppl": report.perplexity,
        "ppl_err": report.perplexity_error,
        "tokens": report.tokens_scored,
    }
    if report.divergence:
        row.update(
            kl_mean=report.divergence.kl_mean, kl_p99=report.divergence.kl_p99, top1=report.divergence.top1_agreement
        )
    return row


def heal(work: Path, args: argparse.Namespace) -> dict:
    from slim import models
    from slim.runtime.formats.checkpoint import Checkpoint
    from slim.runtime.formats.mixes import mix
    from slim.runtime.pipeline.calibrate import calibrate
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.pipeline.prune import plan_layers, prune_checkpoint
    from slim.runtime.train.distill import distill, teacher_targets

    data = prepare(work, args.threads)
    test = held_out(data["test"], args.eval_chunks)
    pruned, healed = work / "pruned-hf", work / "healed-hf"
    arch = models.for_hf_config(Checkpoint(data["hf"]).config)
    if not pruned.exists():
        calibration = calibrate(
            data["f16"], data["train"][:200_000], ctx=512, chunks=8, threads=args.threads, hidden_states=True
        )
        plan = plan_layers(arch, calibration, 4)
        prune_checkpoint(data["hf"], pruned, plan)
        (work / "pruned-blocks.json").write_text(json.dumps(plan.removed_blocks))
    removed = json.loads((work / "pruned-blocks.json").read_text())
    convert(pruned, work / "pruned-hf-f16.gguf", mix("F16"), threads=args.threads)
    full = score(data["f16"], test, args.threads)
    before = score(work / "pruned-hf-f16.gguf", test, args.threads)

    shutil.rmtree(healed, ignore_errors=True)
    started = time.perf_counter()
    train_text = data["train"][: args.train_chars]
    teacher_targets(data["f16"], train_text, args.seq_len, 32, threads=args.threads, cache_dir=work / "cache")
    # the whole run, teacher pass included, gets --heal-minutes; a minute is kept for writing the result
    budget = args.heal_minutes * 60 - (time.perf_counter() - started) - 60
    summary = distill(
        data["f16"],
        pruned,
        train_text,
        healed,
        steps=args.heal_steps,
        lr=args.lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        alpha=args.alpha,
        temperature=1.0,
        threads=args.threads,
        time_limit=budget,
        cache_dir=work / "cache",
        mix=mix("F16"),
        progress=lambda step, total, loss: print(f"heal step {step}/{total} loss {loss:.4f}", flush=True),
    )
    wall = time.perf_counter() - started
    after = score(Path(summary.gguf), test, args.threads)
    loss = before["ppl"] - full["ppl"]
    result = {
        "removed_blocks": removed,
        "full": full,
        "pruned": before,
        "healed": after,
        "steps": summary.steps,
        "tokens": summary.tokens_trained,
        "wall_s": wall,
        "recovered": (before["ppl"] - after["ppl"]) / loss if loss else None,
    }
    (work / "heal.json").write_text(json.dumps(result, indent=2))
    return result


def qat_part(work: Path, args: argparse.Namespace) -> dict:
    """Q4_K_M four ways, scored against F16 on held-out Wikipedia (the training domain) and on
    tiny-shakespeare (a domain QAT never saw): post-training without and with the imatrix
    (the latter is llama-quantize --imatrix's file, byte for byte), the thorough search with the
    imatrix (QAT's starting point), and QAT at its defaults."""
    from slim.runtime.formats.mixes import mix
    from slim.runtime.inference.evaluate import ReferenceLogits, evaluate
    from slim.runtime.pipeline.calibrate import calibrate
    from slim.runtime.pipeline.convert import convert
    from slim.runtime.train.qat import qat

    data = prepare(work, args.threads)
    texts = {
        "wiki": held_out(data["test"], args.eval_chunks),
        "shakespeare": held_out(assets.fetch("tiny-shakespeare.txt").read_text(encoding="utf-8"), args.eval_chunks),
    }
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        calibrate(data["f16"], data["train"][:200_000], ctx=512, chunks=12, threads=args.threads).save(imatrix)
    files = {
        "ptq": work / "ptq-q4_k_m.gguf",
        "ptq_imatrix": work / "ptq-q4_k_m-imatrix.gguf",
        "ptq_imatrix_thorough": work / "ptq-q4_k_m-imatrix-thorough.gguf",
    }
    convert(data["hf"], files["ptq"], mix("Q4_K_M"), threads=args.threads)
    convert(data["hf"], files["ptq_imatrix"], mix("Q4_K_M"), imatrix=imatrix, threads=args.threads)
    convert(
        data["hf"],
        files["ptq_imatrix_thorough"],
        mix("Q4_K_M"),
        imatrix=imatrix,
        search="thorough",
        threads=args.threads,
    )

    out = work / "qat-q4_k_m.gguf"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = qat(
        data["hf"],
        mix("Q4_K_M"),
        data["train"][: args.train_chars],
        out,
        teacher=data["f16"],
        imatrix=imatrix,
        steps=args.qat_steps,
        lr=args.qat_lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        threads=args.threads,
        time_limit=args.qat_minutes * 60,
        cache_dir=work / "cache",
        progress=lambda step, total, loss: print(f"qat step {step}/{total} loss {loss:.4f}", flush=True),
    )
    wall = time.perf_counter() - started
    files["qat"] = out

    rows: dict[str, list[dict]] = {}
    for name, text in texts.items():
        _, reference = evaluate(files["ptq"], text, n_ctx=512, reference=data["f16"], n_threads=args.threads)
        assert isinstance(reference, ReferenceLogits)
        rows[name] = [score(data["f16"], text, args.threads)] + [
            score(path, text, args.threads, reference) for path in files.values()
        ]
    result = {
        "rows": rows,
        "steps": summary.steps,
        "tokens": summary.tokens_trained,
        "wall_s": wall,
        "summary": summary.line(),
    }
    (work / "qat.json").write_text(json.dumps(result, indent=2))
    return result


def report(work: Path) -> None:
    if (work / "heal.json").exists():
        h = json.loads((work / "heal.json").read_text())
        print(
            f"Healing: blocks {h['removed_blocks']} removed; {h['steps']} steps, {h['tokens']} tokens, "
            f"{h['wall_s'] / 60:.1f} min wall-clock (teacher pass included)\n"
        )
        print("| model | PPL | ± |\n|---|---:|---:|")
        for key in ("full", "pruned", "healed"):
            print(f"| {key} ({h[key]['model']}) | {h[key]['ppl']:.3f} | {h[key]['ppl_err']:.3f} |")
        print(f"\nrecovered {100 * h['recovered']:.1f}% of the perplexity lost to pruning\n")
    if (work / "qat.json").exists():
        q = json.loads((work / "qat.json").read_text())
        print(f"QAT: {q['steps']} steps, {q['tokens']} tokens, {q['wall_s'] / 60:.1f} min wall-clock")
        print(f"({q['summary']})\n")
        for text, rows in q["rows"].items():
            print(f"{text}:\n\n| model | size MB | PPL | KL mean vs F16 | KL p99 | top-1 |")
            print("|---|---:|---:|---:|---:|---:|")
            for r in rows:
                kl = (
                    f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1']:.2f}%"
                    if "kl_mean" in r
                    else "- | - | -"
                )
                print(f"| {r['model']} | {r['size_mb']:.1f} | {r['ppl']:.3f} | {kl} |")
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["heal", "qat", "report"], required=True)
    parser.add_argument("--work", type=Path, default=Path("build/bench-distill"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-chunks", type=int, default=16)
    parser.add_argument("--train-chars", type=int, default=300_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--heal-steps", type=int, default=60)
    parser.add_argument("--heal-minutes", type=float, default=30)
    parser.add_argument("--qat-lr", type=float, default=3e-5)
    parser.add_argument("--qat-steps", type=int, default=50)
    parser.add_argument("--qat-minutes", type=float, default=15)
    args = parser.parse_args()
    if args.part == "heal":
        heal(args.work, args)
    elif args.part == "qat":
        qat_part(args.work, args)
    report(args.work)


if __name__ == "__main__":
    main()
