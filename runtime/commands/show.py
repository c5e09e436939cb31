"""slim show MODEL"""

from __future__ import annotations

import json

import click

from slim.runtime.cli import fail


@click.command(name="show")
@click.argument("model", required=False)
@click.option("--template", is_flag=True, help="Print the whole chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def command(model: str | None, template: bool, as_json: bool) -> None:
    """Describe a model: architecture, parameters, context, tensor types, size, template, license.

    MODEL is a store name, a catalog name or a path to a .gguf [default: smollm2-135m].
    """
    from slim.runtime import store
    from slim.runtime.formats.model_info import describe

    try:
        info = describe(store.resolve(model))
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(info.as_dict(), indent=2))
        return
    types = ", ".join(f"{n} {t}" for t, n in info.tensor_types.items())
    rows = [
        ("name", info.name or "-"),
        ("file", info.path),
        ("architecture", f"{info.family} ({info.architecture})" if info.family else info.architecture),
        ("type", info.file_type or "-"),
        ("parameters", f"{info.parameters / 1e6:.1f}M"),
        ("context length", str(info.context_length or "-")),
        ("size", f"{info.size_bytes / 1e6:.1f} MB, {info.bits_per_weight:.2f} bits/weight"),
        ("tensor types", types),
        *info.facts.items(),
        ("license", info.license or "unknown"),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    if info.chat_template is None:
        click.echo(f"{'chat template':<{width}}  none (chat uses a plain fallback)")
    elif template:
        click.echo(f"chat template:\n{info.chat_template}")
    else:
        first = info.chat_template.strip().splitlines()[0]
        click.echo(f"{'chat template':<{width}}  {first[:60]}{'...' if len(first) > 60 else ''} (--template shows all)")
