"""llama.cpp's C API through llama-cpp-python's bindings, silenced and initialised once, and the
machine facts the engine sizes itself by."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["llama_bindings", "physical_cores", "silence_logs"]

_LOG_CALLBACK: Any = None  # kept alive for as long as llama.cpp may call it
_BACKEND_READY = False


def llama_bindings() -> Any:
    """The llama.cpp bindings (llama_cpp.llama_cpp), silenced and initialised once."""
    global _BACKEND_READY
    import llama_cpp.llama_cpp as L

    if not _BACKEND_READY:
        silence_logs()
        L.llama_backend_init()
        _BACKEND_READY = True
    return L


def silence_logs() -> None:
    """Send llama.cpp's log lines nowhere (again, after a caller captured them with llama_log_set)."""
    global _LOG_CALLBACK
    import llama_cpp.llama_cpp as L

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(_LOG_CALLBACK, None)


def physical_cores() -> int:
    """Physical cores this process may run on (llama.cpp is fastest with one thread per core)."""
    try:
        allowed: set[int] | None = os.sched_getaffinity(0)
    except AttributeError:
        allowed = None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        cpu, package = -1, ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, package = int(value), ""
                elif key == "physical id":
                    package = value
                elif key == "core id" and (allowed is None or cpu in allowed):
                    cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores), logical) if cores else logical)
