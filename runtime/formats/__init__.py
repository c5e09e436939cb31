"""File formats, the bottom layer: GGUF reading and checks (gguf_file), Hugging Face checkpoints
(checkpoint), tokenizers both ways (tokenizer), llama-quantize's type mixes (mixes) and the
summary `slim show` prints (model_info).

Imports: slim.kernels, slim.models and runtime.files only; nothing here runs a model.
"""
