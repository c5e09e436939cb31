"""Inference on llama.cpp's C API: the engine (models, sampling, chat templates, text assembly,
continuous batching) and evaluation (perplexity, KL divergence).

Imports: formats, store and runtime.files. The layers above use only the public names here.
"""
