"""slim rm MODEL..."""

from __future__ import annotations

import click

from slim.runtime.cli import fail, size_text


@click.command(name="rm")
@click.argument("names", nargs=-1, required=True, metavar="MODEL...")
def command(names: tuple[str, ...]) -> None:
    """Remove models from the store, and delete each file that no other entry uses.

    A catalog model's file is its download under SLIM_HOME/assets (the next use fetches it again);
    the others are SLIM_HOME/models/NAME.gguf. A file outside SLIM_HOME is never deleted.
    """
    from slim.runtime import store

    for name in names:
        try:
            removed = store.remove(name)
        except ValueError as exc:
            fail(str(exc))
        entry = removed.entry
        if not removed.deleted:
            click.echo(f"removed {entry.name}; its file {entry.file} {removed.kept_because}")
        elif removed.freed_bytes:
            click.echo(f"removed {entry.name}: deleted {entry.file}, freed {size_text(removed.freed_bytes)}")
        else:
            click.echo(
                f"removed {entry.name}: deleted {entry.file}; no space freed, another hard link to the same "
                "data remains (the file it was added from)"
            )
