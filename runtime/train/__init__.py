"""Training-based compression on torch (the optional `train` extra): the torch student model
(student), knowledge distillation (distill) and quantization-aware training (qat).

Imports: formats, store, inference and pipeline (each ends in a GGUF written by convert).
"""
