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


def engine_option(f):
    """--engine, on the commands that serve (serve, chat, info)."""
    return click.option("--engine", type=click.Choice(["auto", "torch", "llama"]),
                        help="Serving engine (default auto: llama.cpp for a GGUF base on the CPU, else torch).")(f)


def _loading(settings) -> str:
    """What the spinner says: the one-time GGUF conversion takes a while (the llama.cpp engine needs it too,
    for the base's tokenizer)."""
    from ownlm.basemodel import CACHE_MARKER, base_sha256, cache_dir, resolve_base

    source = resolve_base(settings.base)
    first = source.kind == "gguf" and not (cache_dir(settings.home, base_sha256(source, settings.home)) / CACHE_MARKER).exists()
    return f"first use of {source.name}: converting the GGUF once (about 30 s)…" if first else f"loading {source.name}…"


def load_with_status(settings):
    """Load the base, telling the user when the one-time GGUF conversion is about to take a while."""
    from ownlm.basemodel import load_base

    with console.status(_loading(settings), spinner="dots"):
        return load_base(settings)


def engine_with_status(settings, store, choice, max_waiting: int | None = None, base=None):
    """The chosen serving engine (engine/serving.py) on `store`, with the loading spinner."""
    from ownlm.engine.serving import load_serving_engine

    if choice.name == "torch":
        return load_serving_engine(settings, store, max_waiting=max_waiting, choice=choice,
                                   base=base or load_with_status(settings))
    with console.status(_loading(settings), spinner="dots"):
        return load_serving_engine(settings, store, max_waiting=max_waiting, choice=choice, base=base)


@cli.command()
@model_options
@engine_option
@click.option("--no-load", is_flag=True, help="Only show settings; do not load the model.")
@pass_ctx
def info(ctx: Context, base: str | None, device: str | None, engine: str | None, no_load: bool) -> None:
    """Show the home, the base model and its sha256, the device, the serving engine and library versions."""
    import torch
    import transformers

    from ownlm.engine.serving import choose_engine
    from ownlm.errors import OwnlmError

    settings = ctx.settings(base=base, device=device, engine=engine)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("ownlm", __version__)
    table.add_row("home", str(settings.home))
    table.add_row("base setting", settings.base)
    try:
        choice = choose_engine(settings)
        table.add_row("serving engine", f"{choice.name} ({choice.reason})")
    except OwnlmError as e:  # an unusable base: said below when loading it, or here with --no-load
        table.add_row("serving engine", f"unknown: {e.message}")
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
@engine_option
@user_option
@click.option("--base-model", is_flag=True, help="Answer with the base model instead of your personal model (to compare).")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=256, show_default=True, help="New tokens at most.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (same seed, same answer).")
@click.option("--system", help="System prompt.")
@click.option("--memory/--no-memory", default=None,
              help="Put your best-matching past conversations into the prompt, as the API's \"memory\" field does "
                   "(default: your `ownlm memory` setting, else the node's memory.enabled).")
@pass_ctx
def chat(ctx: Context, prompt: str | None, base, device, engine, user, base_model, max_tokens, temperature, top_p, seed,
         system, memory) -> None:
    """Chat with your personal model (the base until one is deployed): answer PROMPT, or without PROMPT chat
    interactively (empty line or Ctrl-D ends). Every exchange is stored, like the API's; a session is one
    conversation. With memory, the past conversations an answer drew on are named after it (on stderr)."""
    import types
    import uuid

    from ownlm.api.memory import recall

    from ownlm.engine import GenerationParams
    from ownlm.engine.serving import choose_engine
    from ownlm.store import NewMessage

    settings = ctx.settings(base=base, device=device, engine=engine, user=user)
    choice = choose_engine(settings)  # a bad --base fails before the store is touched
    base_loaded = load_with_status(settings) if choice.name == "torch" else None
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              repetition_penalty=settings.repetition_penalty)
    history = [{"role": "system", "content": system}] if system else []
    with cli_store(settings) as store:
        u = ctx.user(store, settings, create=True)
        engine = engine_with_status(settings, store, choice, base=base_loaded)
        use = "base" if base_model else "personal"
        last: list[str] = []  # id of the last stored message: the next turn continues from it
        conversation: list[str] = []  # this session's conversation id, once stored (memory leaves it out)
        state = types.SimpleNamespace(settings=settings)  # what api.memory reads of an app's state

        def answer(text: str) -> None:
            history.append({"role": "user", "content": text})
            t0 = time.perf_counter()
            # the same recall as the API's: the prompt the engine gets; what is stored is the conversation itself
            recalled = recall(state, store, engine, u.id, history, memory,
                              exclude_conversation=conversation[0] if conversation else None)
            stream = engine.stream(recalled.prompt, params, user_id=u.id, use=use)
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
            conversation[:] = [res.conversation_id]
            if recalled.passages:
                with store.tx() as db:
                    store.audit_memory_use(db, u.id, recalled.passages)  # counts only, as the API's
                click.echo("remembered from: " + "; ".join(f"{s['conversation_id']} ({s['snippet']})"
                                                           for s in recalled.sources()), err=True)
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
