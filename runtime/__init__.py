"""slim's runtime, in layers that import downwards only (tests/test_layout.py checks it):

    cli.py, commands/   the `slim` command, one module per subcommand       (top)
    serve/              the HTTP server and its model pool
    pipeline/, train/   convert, export, calibrate, prune; student, distill, qat
    inference/          llama.cpp engine, continuous batching, evaluation
    formats/, store/    GGUF, checkpoints, tokenizers, mixes; model store, hub, assets
    files.py            atomic writes and file hashes                        (bottom)

A layer may import any layer below it and nothing above; pipeline and train are one layer (pruning
heals by distillation, training ends in convert). Beside them, slim.kernels (quantization) and
slim.models (architectures) are used from the formats layer up.
"""
