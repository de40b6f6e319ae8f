"""`ownlm serve` (the node) and `ownlm token` (bearer tokens for its users)."""

from __future__ import annotations

import click

from ownlm.cli import Context, cli, pass_ctx
from ownlm.cli.model import console, load_with_status, model_options
from ownlm.cli.store import cli_store


@cli.command()
@model_options
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8420).")
@click.option("--no-model", is_flag=True, help="Capture only: do not load a model (generation answers 503).")
@pass_ctx
def serve(ctx: Context, base, device, host, port, no_model) -> None:
    """Run the node: OpenAI-compatible API, WebSocket chat, capture and personalization API."""
    import uvicorn

    from ownlm.api.app import create_app
    from ownlm.engine.personal import PersonalEngine
    from ownlm.node import recover

    settings = ctx.settings(base=base, device=device, host=host, port=port)
    store = cli_store(settings)
    recover(store, settings)  # leftovers of an install that was killed
    engine = None if no_model else PersonalEngine(load_with_status(settings), store)
    app = create_app(settings, store, engine)
    from ownlm.loop import Scheduler

    scheduler = Scheduler(store, settings, on_deployed=engine.refresh if engine else None).start()
    watcher = engine.watch() if engine else None  # installs and rollbacks made by another process
    model = engine.model_name if engine else "none (capture only)"
    console.print(f"ownlm node on http://{settings.host}:{settings.port} — model: {model}; API docs at /docs")
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", ws_max_size=4 * 1024 * 1024)
    finally:
        if watcher is not None:
            watcher.set()
        scheduler.stop()
        store.close()


@cli.group()
def token() -> None:
    """Bearer tokens for the node's users."""


@token.command("create")
@click.argument("user")
@click.option("--label", help="What the token is for (shown in the audit log).")
@pass_ctx
def token_create(ctx: Context, user: str, label: str | None) -> None:
    """Create USER if needed and print a new token for them (shown once)."""
    settings = ctx.settings()
    with cli_store(settings) as store:
        u = store.get_or_create_user(user, tier=settings.personalization.privacy_tier)
        click.echo(store.create_token(u.id, label))


@token.command("revoke")
@click.argument("user")
@pass_ctx
def token_revoke(ctx: Context, user: str) -> None:
    """Revoke every token of USER."""
    with cli_store(ctx.settings()) as store:
        n = store.revoke_tokens(store.get_user(user).id)
    click.echo(f"revoked {n} token(s) of {user}")
