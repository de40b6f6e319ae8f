"""`ownlm export`: the user's personal model for other tools (node/export.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option
from ownlm.node.export import FORMATS


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="gguf-lora: a LoRA adapter for llama.cpp (llama-cli / llama-server --lora) on this node's GGUF base; "
                   "peft: a PEFT adapter directory for transformers; ollama: a Modelfile and adapter for `ollama create`.")
@click.option("--version", "version", metavar="V", help="Model id or version number (default: the one serving the user).")
@user_option
@pass_ctx
def export(ctx: Context, directory: Path, fmt: str, version: str | None, user) -> None:
    """Write the user's personal model into DIRECTORY in a format other tools load."""
    from ownlm.node.export import export_model

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        done = export_model(store, settings, ctx.user(store, settings), directory, fmt, version)
    what = {"gguf-lora": "a GGUF LoRA adapter", "peft": "a PEFT LoRA adapter", "ollama": "an Ollama model (GGUF LoRA adapter)"}
    console.print(f"{done.model_id} (v{done.version}) written as {what[fmt]} of {done.base}:", highlight=False, markup=False, soft_wrap=True)
    for path in done.files:
        console.print(f"  {path}", highlight=False, markup=False, soft_wrap=True)
    for line in done.run:
        console.print(f"run it with: {line}", highlight=False, markup=False, soft_wrap=True)
    for note in done.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
