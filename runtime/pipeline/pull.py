"""slim pull: a model into the store, from slim's catalog, the Hugging Face Hub or a local file.

A hub repo with GGUF files gives one of them as it is, in a download that an interrupted pull
resumes; a repo with a safetensors checkpoint is downloaded and converted; a local .gguf is linked
into the store. Either way the file is checked before the store names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from slim.runtime import store
from slim.runtime.formats import mixes
from slim.runtime.pipeline import Progress
from slim.runtime.store import hub

DEFAULT_CONVERT_MIX = "Q4_K_M"


@dataclass(frozen=True)
class Pulled:
    entry: store.StoreEntry
    type_name: str | None  # the GGUF's file type (Q4_K_M, Q8_0, ...); None for a GGUF without tensors
    already: bool = False  # the store held this very file under this name before: nothing was fetched


def pull(
    source: str,
    type_name: str | None = None,
    name: str | None = None,
    *,
    progress: Progress | None = None,
    replace: bool = False,
) -> Pulled:
    """Fetch `source`, a catalog name, a hub repo id or a local .gguf, into the store as `name`
    (default: see default_name; a local file's name without .gguf). type_name: in a GGUF repo, the
    file whose name holds it; for a checkpoint repo, the mix to convert to (default Q4_K_M).
    progress: None also silences huggingface_hub's bars. replace: a local file may take a name the
    store gives another file."""
    from slim.runtime.formats.model_info import file_type_name

    if name is not None:
        store.check_name(name)
    local = Path(source).expanduser()
    if local.is_file() or source.endswith(".gguf"):
        return pull_file(local, type_name, name, replace=replace)
    if source in store.CATALOG:
        if type_name is not None:
            raise store.StoreError(
                f"{source} is a catalog model with one fixed file ({store.CATALOG[source].asset}); "
                "--type applies to hub repos"
            )
        held = store.entries().get(name or source)
        entry = store.pull_catalog(source, name)
        already = held is not None and held.file == entry.file
        return Pulled(entry, file_type_name(entry.path), already)
    if not hub.is_repo_id(source):
        raise store.StoreError(
            f"{source!r} is neither a catalog model ({', '.join(store.CATALOG)}), a local .gguf file, "
            "nor a hub repo id like owner/name"
        )
    return pull_hub(source, type_name, name, progress=progress)


def pull_file(path: Path, type_name: str | None = None, name: str | None = None, *, replace: bool = False) -> Pulled:
    """A local GGUF into the store (hard-linked where possible, see store.import_file); a name the
    store gives another file is refused unless `replace`."""
    from slim.runtime.formats.model_info import file_type_name

    if type_name is not None:
        raise store.StoreError(f"{path} is added as it is; --type applies to hub repos (convert with `slim convert`)")
    if not path.is_file():
        raise store.StoreError(f"{path} does not exist")
    name = name or store.name_for_file(path)
    held = store.entries().get(name)
    if held is not None and held.path.exists() and held.path.samefile(path):
        return Pulled(held, file_type_name(held.path), already=True)
    entry = store.import_file(name, path, f"file:{path.resolve()}", replace=replace)
    return Pulled(entry, file_type_name(entry.path))


def default_name(repo_id: str, type_name: str | None) -> str:
    """The repo name lower-cased without a trailing -gguf, plus :TYPE when a type was asked for."""
    base = re.sub(r"[-_.]gguf$", "", repo_id.split("/", 1)[1].lower())
    return f"{base}:{type_name.lower()}" if type_name else base


def pull_hub(
    repo_id: str, type_name: str | None = None, name: str | None = None, *, progress: Progress | None = None
) -> Pulled:
    """One GGUF of a hub repo, or its checkpoint converted, into the store (see `pull`)."""
    name = name or default_name(repo_id, type_name)
    try:
        target = store.model_file(name)
    except ValueError as exc:
        raise store.StoreError(f"{exc}; choose one with --name") from None
    listing = hub.list_repo(repo_id)
    held = store.entries().get(name)
    if listing.ggufs:
        file_type, already = _download_gguf(listing, type_name, target, progress)
    elif listing.has_checkpoint:
        mix = mixes.mix(type_name or DEFAULT_CONVERT_MIX)  # an unknown type fails before any download
        file_type, already = _convert_checkpoint(repo_id, mix, target, progress), False
    else:
        shown = ", ".join(listing.files[:12]) + (" ..." if len(listing.files) > 12 else "")
        raise hub.HubInputError(
            f"hub repo {repo_id} has neither a GGUF file nor a safetensors checkpoint "
            f"(config.json + *.safetensors); it holds: {shown or 'no files'}"
        )
    source = f"hub:{repo_id}"
    already = already and held is not None and held.path == target.resolve() and held.source == source
    return Pulled(held if held is not None and already else store.add(name, target, source), file_type, already)


def _download_gguf(
    listing: hub.RepoListing, type_name: str | None, target: Path, progress: Progress | None
) -> tuple[str | None, bool]:
    """Download the chosen GGUF to `target` (checked before it is moved there): its file type, and
    whether `target` held these very bytes already (then nothing is downloaded)."""
    from slim.runtime.files import file_lock, file_sha256, move_into_place
    from slim.runtime.formats.model_info import file_type_name

    filename = hub.pick_gguf(listing, type_name)
    remote = hub.remote_file(listing.repo_id, filename, listing.sha)
    # Not a temporary of files.atomic_path: an interrupted download must outlive the run that began
    # it, under a name the next run finds again (the file's ETag), so that the pull resumes there.
    partial = target.parent / ".downloads" / f"{re.sub(r'[^0-9A-Za-z]', '', remote.etag)[:64]}.part"
    # One download of a file at a time: a second pull of it waits here, then finds the file in place.
    with file_lock(partial.with_suffix(".lock")):
        if remote.sha256 and target.exists() and file_sha256(target) == remote.sha256:
            return file_type_name(target), True  # already here, byte for byte
        stage = filename.rsplit("/", 1)[-1]
        received, size = 0, remote.size

        def start(total: int | None, already: int) -> None:
            nonlocal received, size
            received, size = already, total
            if progress:
                progress(stage, received, size)

        def advance(count: int) -> None:
            nonlocal received
            received += count
            if progress:
                progress(stage, received, size)

        hub.download(remote, partial, on_start=start, progress=advance)
        try:
            file_type = file_type_name(partial)  # checked before anything trusts it
        except ValueError as exc:
            partial.unlink(missing_ok=True)
            raise hub.HubError(f"{filename} from {listing.repo_id} is not a usable GGUF: {exc}") from None
        move_into_place(partial, target)
    return file_type, False


def _convert_checkpoint(repo_id: str, mix: mixes.Mix, target: Path, progress: Progress | None) -> str:
    """Download a checkpoint and convert it straight into `target` (convert writes a temporary
    file next to it and renames it into place when complete); the type it was converted to."""
    from slim.runtime.pipeline.convert import convert

    if progress is None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    directory = hub.download_checkpoint(repo_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    written, size = 0, None

    def planned(total: int) -> None:
        nonlocal size
        size = total
        if progress:
            progress("converting", written, size)

    def advance(count: int) -> None:
        nonlocal written
        written += count
        if progress:
            progress("converting", written, size)

    return convert(directory, target, mix, on_plan=planned, progress=advance).type
