"""The offline pipeline: HF -> GGUF (convert), GGUF -> HF (export), the importance matrix
(calibrate) and pruning (prune). Each is a library function the CLI only wraps.

Imports: formats, store, inference and train (pruning's healing distils); kernels and models.
"""
