"""One module per architecture. Each defines ARCHITECTURE, a DecoderArchitecture subclass;
this registry finds them by scanning the package, so adding one touches one file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import cache
from typing import Any

from .base import ArchitectureError, DecoderArchitecture, LayerAttention, MixtureOfExperts


@cache
def registry() -> tuple[type[DecoderArchitecture], ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.append(module.ARCHITECTURE)
    return tuple(found)


def supported() -> list[str]:
    return sorted(name for arch in registry() for name in arch.hf_architectures)


def class_for_hf_config(config: dict[str, Any]) -> type[DecoderArchitecture] | None:
    """The architecture class a config.json names, without reading its hyperparameters."""
    names = config.get("architectures") or []
    for arch in registry():
        if any(name in arch.hf_architectures for name in names):
            return arch
    return None


def for_hf_config(config: dict[str, Any]) -> DecoderArchitecture:
    """The architecture a transformers config.json names, built from that config."""
    arch = class_for_hf_config(config)
    if arch is not None:
        return arch(config)
    names = config.get("architectures") or []
    raise ArchitectureError(
        f"architecture {', '.join(names) or '(none named in config.json)'} is not supported; "
        f"slim converts: {', '.join(supported())}"
    )


def for_gguf_arch(gguf_arch: str, fields: Mapping[str, Any] | None = None) -> type[DecoderArchitecture]:
    """The architecture of a GGUF's general.architecture. One llama.cpp architecture may stand for two
    families (`llama`: Llama and Mixtral): its metadata `fields` tell them apart by the expert count."""
    with_experts = bool((fields or {}).get(f"{gguf_arch}.expert_count"))
    candidates = [arch for arch in registry() if arch.gguf_arch == gguf_arch]
    for arch in candidates:
        if issubclass(arch, MixtureOfExperts) == with_experts:
            return arch
    if candidates:
        return candidates[0]
    known = ", ".join(sorted(a.gguf_arch for a in registry()))
    raise ArchitectureError(f"GGUF architecture {gguf_arch!r} is not supported; slim handles: {known}")


__all__ = [
    "ArchitectureError",
    "DecoderArchitecture",
    "LayerAttention",
    "MixtureOfExperts",
    "class_for_hf_config",
    "for_gguf_arch",
    "for_hf_config",
    "registry",
    "supported",
]
