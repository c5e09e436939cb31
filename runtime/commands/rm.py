"""slim rm MODEL"""

from __future__ import annotations

import click

from slim.runtime.cli import fail


@click.command(name="rm")
@click.argument("names", nargs=-1, required=True, metavar="MODEL...")
def command(names: tuple[str, ...]) -> None:
    """Remove models from the store (their files too, when the store holds them)."""
    from slim.runtime import store

    for name in names:
        try:
            entry = store.remove(name)
        except ValueError as exc:
            fail(str(exc))
        click.echo(f"removed {entry.name}")
