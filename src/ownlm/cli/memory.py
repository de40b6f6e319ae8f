"""`ownlm memory`: whether your requests use memory, what it would recall, and rebuilding its index."""

from __future__ import annotations

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option


@cli.group()
def memory() -> None:
    """Memory beside the weights: passages of your own history in the prompt (never leaves this node)."""


def _show(store, settings, u) -> None:
    own = store.memory_setting(u.id)
    on = settings.memory.enabled if own is None else own
    why = "your setting" if own is not None else "the node's default, memory.enabled"
    console.print(f"user {u.name}: memory {'on' if on else 'off'} ({why}); {store.memory_count(u.id):,} passages indexed; "
                  f"up to {settings.memory.passages} passages, {settings.memory.budget_tokens} tokens per request")


@memory.command("show")
@user_option
@pass_ctx
def memory_show(ctx: Context, user) -> None:
    """Whether memory is on for you, and why."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        _show(store, settings, ctx.user(store, settings))


@memory.command("set")
@click.argument("state", type=click.Choice(["on", "off", "default"]))
@user_option
@pass_ctx
def memory_set(ctx: Context, state: str, user) -> None:
    """Turn memory on or off for your requests, or back to the node's default (audited). A request's own
    `"memory": true|false` still decides for that request."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        store.set_memory(u.id, {"on": True, "off": False, "default": None}[state])
        _show(store, settings, u)


@memory.command("search")
@click.argument("text")
@click.option("--limit", type=click.IntRange(1, 50), default=None, help="Passages (default: memory.passages).")
@user_option
@pass_ctx
def memory_search(ctx: Context, text: str, limit: int | None, user) -> None:
    """The passages memory would recall for TEXT (best first), as the prompt would get them (redacted)."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        found = store.recall(ctx.user(store, settings).id, text, limit or settings.memory.passages)
    if not found:
        console.print("nothing recalled (no passage shares a word with the text, stopwords aside)")
    for i, p in enumerate(found, start=1):
        console.print(f"[{i}] {p.conversation_id}  score {p.score:.3f}\n    user: {p.question[:200]}\n"
                      f"    reply: {p.answer[:200]}", markup=False, highlight=False)


@memory.command("rebuild")
@user_option
@pass_ctx
def memory_rebuild(ctx: Context, user) -> None:
    """Index your stored replies again from scratch (normally kept up to date as you chat and import)."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        n = store.rebuild_memory(u.id)
    console.print(f"user {u.name}: {n:,} passages indexed")
