"""slim: shrink a Hugging Face language model to one quantized GGUF and run it on a laptop."""

__version__ = "0.1.0"
