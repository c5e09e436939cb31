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

    MODEL is a store name, a catalog name or a path to a .gguf [default: smollm2-135m]. An
    importance matrix (slim calibrate, llama-imatrix) is described too: its text, chunks, weights
    and, for a mixture of experts, how often each expert was chosen in each layer.
    """
    from slim.runtime import store
    from slim.runtime.formats.gguf_file import read_header
    from slim.runtime.formats.model_info import describe
    from slim.runtime.formats.quality import Quality

    try:
        path = store.resolve(model)
        if read_header(path).metadata.get("general.type") == "imatrix":
            _show_imatrix(path, as_json)
            return
        info = describe(path)
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
    if info.quality:
        rows.append(("quality", Quality(**info.quality).line()))
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


def _show_imatrix(path: object, as_json: bool) -> None:
    from slim.runtime.pipeline.calibrate import Calibration

    cal = Calibration.load(str(path))
    routing = cal.routing()
    summary = {
        "file": str(path),
        "kind": "importance matrix",
        "datasets": cal.datasets,
        "chunks": cal.chunk_count,
        "chunk_size": cal.chunk_size,
        "weights": len(cal.sums) + len(cal.expert_sums),
        "routing": {str(layer): shares.round(4).tolist() for layer, shares in routing.items()},
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"file          {path}")
    click.echo(f"kind          importance matrix, {summary['weights']} weights")
    click.echo(f"text          {', '.join(cal.datasets) or '-'}: {cal.chunk_count} chunks of {cal.chunk_size} tokens")
    if routing:
        click.echo("routing       share of routing choices per expert, by layer:")
        for layer, shares in routing.items():
            cells = " ".join(f"{share * 100:4.1f}" for share in shares)
            click.echo(f"  layer {layer:>3}   {cells}  (%)")
