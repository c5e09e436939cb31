"""slim pull: a model into the store, from slim's catalog or the Hugging Face Hub.

A hub repo with GGUF files gives one of them as it is, in a download that an interrupted pull
resumes; a repo with a safetensors checkpoint is downloaded and converted. Either way the file is
checked before the store names it.
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
    type_name: str | None  # the GGUF's file type (Q4_K_M, Q8_0, ...) where known; None for a catalog model


def pull(
    source: str, type_name: str | None = None, name: str | None = None, *, progress: Progress | None = None
) -> Pulled:
    """Fetch `source`, a catalog name or a hub repo id, into the store as `name` (default: see
    default_name). type_name: in a GGUF repo, the file whose name holds it; for a checkpoint repo,
    the mix to convert to (default Q4_K_M). progress: None also silences huggingface_hub's bars."""
    if name is not None:
        store.check_name(name)
    if source in store.CATALOG:
        if type_name is not None:
            raise store.StoreError(
                f"{source} is a catalog model with one fixed file ({store.CATALOG[source].asset}); "
                "--type applies to hub repos"
            )
        return Pulled(store.pull_catalog(source, name), None)
    if not hub.is_repo_id(source):
        raise store.StoreError(
            f"{source!r} is neither a catalog model ({', '.join(store.CATALOG)}) nor a hub repo id like owner/name"
        )
    return pull_hub(source, type_name, name, progress=progress)


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
    if listing.ggufs:
        file_type = _download_gguf(listing, type_name, target, progress)
    elif listing.has_checkpoint:
        mix = mixes.mix(type_name or DEFAULT_CONVERT_MIX)  # an unknown type fails before any download
        file_type = _convert_checkpoint(repo_id, mix, target, progress)
    else:
        shown = ", ".join(listing.files[:12]) + (" ..." if len(listing.files) > 12 else "")
        raise hub.HubInputError(
            f"hub repo {repo_id} has neither a GGUF file nor a safetensors checkpoint "
            f"(config.json + *.safetensors); it holds: {shown or 'no files'}"
        )
    return Pulled(store.add(name, target, f"hub:{repo_id}"), file_type)


def _download_gguf(
    listing: hub.RepoListing, type_name: str | None, target: Path, progress: Progress | None
) -> str | None:
    """Download the chosen GGUF to `target` (checked before it is moved there); its file type."""
    from slim.runtime.files import file_sha256, move_into_place
    from slim.runtime.formats.gguf_file import open_gguf
    from slim.runtime.formats.model_info import file_type_name

    filename = hub.pick_gguf(listing, type_name)
    remote = hub.remote_file(listing.repo_id, filename, listing.sha)
    if remote.sha256 and target.exists() and file_sha256(target) == remote.sha256:
        return file_type_name(open_gguf(target))  # already here, byte for byte
    # Not a temporary of files.atomic_path: an interrupted download must outlive the run that began
    # it, under a name the next run finds again (the file's ETag), so that the pull resumes there.
    partial = target.parent / ".downloads" / f"{re.sub(r'[^0-9A-Za-z]', '', remote.etag)[:64]}.part"
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
        file_type = file_type_name(open_gguf(partial))  # checked before anything trusts it
    except ValueError as exc:
        partial.unlink(missing_ok=True)
        raise hub.HubError(f"{filename} from {listing.repo_id} is not a usable GGUF: {exc}") from None
    move_into_place(partial, target)
    return file_type


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
