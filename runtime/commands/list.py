"""slim list"""

from __future__ import annotations

import json
from typing import TypedDict

import click

from slim.runtime.cli import fail


class _Row(TypedDict):
    """One stored model, as `slim list --json` prints it."""

    name: str
    size_bytes: int | None  # None when its file is missing
    source: str
    file: str


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the store as JSON.")
def command(as_json: bool) -> None:
    """List the models in the store (SLIM_HOME/models), and the catalog models not yet fetched."""
    from slim.runtime import store

    try:
        entries = store.entries()
    except ValueError as exc:
        fail(str(exc))
    rows: list[_Row] = []
    for entry in entries.values():
        size_bytes = entry.path.stat().st_size if entry.path.exists() else None
        rows.append({"name": entry.name, "size_bytes": size_bytes, "source": entry.source, "file": entry.file})
    available = [
        {"name": c.name, "description": c.description} for c in store.CATALOG.values() if c.name not in entries
    ]
    if as_json:
        click.echo(json.dumps({"models": rows, "catalog": available}, indent=2))
        return
    if not rows:
        click.echo("no models in the store yet")
    else:
        width = max(len(r["name"]) for r in rows)
        click.echo(f"{'NAME':<{width}}  {'SIZE':>9}  SOURCE")
        for r in rows:
            size_bytes = r["size_bytes"]
            size = f"{size_bytes / 1e6:.1f} MB" if size_bytes is not None else "missing"
            click.echo(f"{r['name']:<{width}}  {size:>9}  {r['source']}")
    for c in available:
        click.echo(f"available: {c['name']} - {c['description']} (`slim pull {c['name']}`)")
