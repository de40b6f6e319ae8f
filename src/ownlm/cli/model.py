"""`ownlm info` and `ownlm chat`: the base model, the device and a conversation with the user's model."""

from __future__ import annotations

import platform
import sys
import time

import click
from rich.table import Table

from ownlm import __version__
from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option



def model_options(f):
    """--base and --device, shared by every command that loads a model."""
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (default auto).")(f)
    f = click.option(
        "--base", metavar="PATH", help="Base model: 'embedded', a .gguf file or a checkpoint directory."
    )(f)
    return f


def load_with_status(settings):
    """Load the base, telling the user when the one-time GGUF conversion is about to take a while."""
    from ownlm.basemodel import CACHE_MARKER, base_sha256, cache_dir, load_base, resolve_base

    source = resolve_base(settings.base)
    first = source.kind == "gguf" and not (cache_dir(settings.home, base_sha256(source, settings.home)) / CACHE_MARKER).exists()
    message = f"first use of {source.name}: converting the GGUF once (about 30 s)…" if first else f"loading {source.name}…"
    with console.status(message, spinner="dots"):
        return load_base(settings)


@cli.command()
@model_options
@click.option("--no-load", is_flag=True, help="Only show settings; do not load the model.")
@pass_ctx
def info(ctx: Context, base: str | None, device: str | None, no_load: bool) -> None:
    """Show the home, the base model and its sha256, the device and library versions."""
    import torch
    import transformers

    settings = ctx.settings(base=base, device=device)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("ownlm", __version__)
    table.add_row("home", str(settings.home))
    table.add_row("base setting", settings.base)
    if not no_load:
        b = load_with_status(settings)
        table.add_row("base model", f"{b.source.name} ({b.source.kind}: {b.source.path})")
        table.add_row("base sha256", b.sha256)
        table.add_row("parameters", f"{b.n_params:,}")
        cached = "yes (safetensors cache)" if b.from_cache else ("built now" if b.source.kind == "gguf" else "n/a (checkpoint)")
        table.add_row("cached", cached)
        table.add_row("load time", f"{b.load_seconds:.2f} s")
        table.add_row("device", b.device.describe())
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    console.print(table)


@cli.command()
@click.argument("prompt", required=False)
@model_options
@user_option
@click.option("--base-model", is_flag=True, help="Answer with the base model instead of your personal model (to compare).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=256, show_default=True, help="New tokens at most.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (same seed, same answer).")
@click.option("--system", help="System prompt.")
@pass_ctx
def chat(ctx: Context, prompt: str | None, base, device, user, base_model, max_tokens, temperature, top_p, seed,
         system) -> None:
    """Chat with your personal model (the base until one is deployed): answer PROMPT, or without PROMPT chat
    interactively (empty line or Ctrl-D ends). Every exchange is stored, like the API's; a session is one
    conversation."""
    import uuid

    from ownlm.engine import GenerationParams
    from ownlm.engine.personal import PersonalEngine
    from ownlm.store import NewMessage

    settings = ctx.settings(base=base, device=device, user=user)
    base_loaded = load_with_status(settings)  # a bad --base fails before the store is touched
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    history = [{"role": "system", "content": system}] if system else []
    with cli_store(settings) as store:
        u = ctx.user(store, settings, create=True)
        engine = PersonalEngine(base_loaded, store)
        use = "base" if base_model else "personal"
        last: list[str] = []  # id of the last stored message: the next turn continues from it

        def answer(text: str) -> None:
            history.append({"role": "user", "content": text})
            t0 = time.perf_counter()
            stream = engine.stream(history, params, user_id=u.id, use=use)
            parts = []
            for piece in stream:
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(parts)})
            # stored as the API stores it: the reply names the model that wrote it (a model id or the base)
            answered_by = stream.model_id[1] if stream.model_id else engine.base_name
            new = [NewMessage(m["role"], m["content"]) for m in (history[-2:] if last else history)]
            new[-1].model = answered_by
            # the first turn opens a conversation of its own; later turns continue it
            res = store.capture(u.id, new, source="cli", after=last[-1] if last else None,
                                seed=None if last else f"cli:{uuid.uuid4().hex}")
            last.append(res.message_ids[-1])
            dt = time.perf_counter() - t0
            if ctx.debug:
                click.echo(f"[{stream.completion_tokens} tokens, {stream.completion_tokens / dt:.1f} tok/s]", err=True)

        if prompt is not None:
            answer(prompt)
            return
        model = engine.model_for(u.id, use)
        who = f"the personal model {model[1]}" if model else f"the base model {engine.base_name}"
        click.echo(f"chatting as {u.name} with {who} — empty line or Ctrl-D to quit", err=True)
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
            answer(text)
