"""slim list (alias: slim ls)"""

from __future__ import annotations

import json
from typing import TypedDict

import click

from slim.runtime.cli import fail, size_text


class _Row(TypedDict):
    """One stored model, as `slim list --json` prints it."""

    name: str
    type: str | None  # Q4_K_M, Q8_0, ... from the GGUF's header; None when its file is missing or damaged
    size_bytes: int | None  # None when its file is missing
    source: str
    file: str
    kl_mean: (
        float | None
    )  # the measured KL divergence the file records (slim convert --target-size, eval --write-metadata)


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the store as JSON.")
def command(as_json: bool) -> None:
    """List the models in the store, and the catalog models not yet fetched.

    SOURCE says where each came from: catalog:, hub:REPO, file:PATH (slim pull of a local .gguf) or
    the command that wrote it (convert:, prune:, qat:, distill:, with --name).
    """
    from slim.runtime import store
    from slim.runtime.formats.model_info import file_type_name
    from slim.runtime.formats.quality import read_quality

    try:
        entries = store.entries()
    except ValueError as exc:
        fail(str(exc))
    rows: list[_Row] = []
    for entry in entries.values():
        present = entry.path.exists()
        try:
            type_name = file_type_name(entry.path) if present else None
        except ValueError:
            type_name = None
        quality = read_quality(entry.path) if type_name else None
        rows.append(
            {
                "name": entry.name,
                "type": type_name,
                "size_bytes": entry.path.stat().st_size if present else None,
                "source": entry.source,
                "file": entry.file,
                "kl_mean": quality.kl_mean if quality else None,
            }
        )
    available = [
        {"name": c.name, "description": c.description} for c in store.CATALOG.values() if c.name not in entries
    ]
    if as_json:
        click.echo(json.dumps({"models": rows, "catalog": available}, indent=2))
        return
    if not rows:
        click.echo("no models in the store yet")
    else:
        width = max(len("NAME"), *(len(r["name"]) for r in rows))
        type_width = max(len("TYPE"), *(len(r["type"] or "-") for r in rows))
        click.echo(f"{'NAME':<{width}}  {'TYPE':<{type_width}}  {'SIZE':>9}  {'KL':>7}  SOURCE")
        for r in rows:
            size_bytes = r["size_bytes"]
            size = size_text(size_bytes) if size_bytes is not None else "missing"
            kl = f"{r['kl_mean']:.4f}" if r["kl_mean"] is not None else "-"
            click.echo(f"{r['name']:<{width}}  {r['type'] or '-':<{type_width}}  {size:>9}  {kl:>7}  {r['source']}")
    for c in available:
        click.echo(f"available: {c['name']} - {c['description']} (`slim pull {c['name']}`)")
