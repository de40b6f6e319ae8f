"""`ownlm serve` (the node) and `ownlm token` (bearer tokens for its users)."""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx
from ownlm.cli.model import engine_option, engine_with_status, model_options
from ownlm.errors import ConfigError

log = logging.getLogger(__name__)
# After SIGTERM/SIGINT: generations are cancelled at once, so open streams end within a decode step; this
# bounds whatever else is still open (a slow upload, an import) before uvicorn cancels it.
GRACEFUL_SHUTDOWN_S = 5
SCHEDULER_STOP_S = 3  # a training round in progress is left to its daemon thread; the job resumes next start


@cli.command()
@model_options
@engine_option
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8420).")
@click.option("--no-model", is_flag=True, help="Capture only: do not load a model (generation answers 503).")
@pass_ctx
def serve(ctx: Context, base, device, engine, host, port, no_model) -> None:
    """Run the node: OpenAI-compatible API, WebSocket chat, capture and personalization API."""
    import uvicorn

    from ownlm.api.app import create_app
    from ownlm.engine.serving import choose_engine
    from ownlm.loop import Scheduler
    from ownlm.node.install import recover
    from ownlm.privacy.fedretire import finish_all_interrupted

    settings = ctx.settings(base=base, device=device, engine=engine, host=host, port=port)
    choice = None if no_model else choose_engine(settings)
    sock = listen(settings.host, settings.port)  # before the slow model load, and before saying "listening"
    store = cli_store(settings)
    recover(store, settings)  # leftovers of an install that was killed
    for path in finish_all_interrupted(store, settings):  # a delete whose retire notice a crash kept from being written
        click.echo(f"wrote retire notice {path}: take it to your other devices (ownlm federate retire FILE)", err=True)
    engine = None if no_model else engine_with_status(settings, store, choice, max_waiting=settings.max_queued_generations)
    app = create_app(settings, store, engine)
    scheduler = Scheduler(store, settings, on_deployed=engine.refresh if engine else None).start()
    watcher = engine.watch() if engine else None  # installs and rollbacks made by another process
    model = f"{engine.model_name} on {choice.name} ({choice.reason})" if engine else "none (capture only)"
    config = uvicorn.Config(app, log_level="warning", ws_max_size=4 * 1024 * 1024,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    console.print(f"ownlm node on http://{settings.host}:{settings.port} — model: {model}; API docs at /docs")
    try:
        node_server(config, on_exit=engine.close if engine else None).run(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.set()
        if scheduler.stop(SCHEDULER_STOP_S):
            store.close()
        else:  # its thread still uses the store; the process exit ends both, and the job resumes next start
            log.warning("stopped during a learning round; it resumes when the node starts again")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ConfigError saying how to pick another port (not a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)  # listening at once makes the port ours (two SO_REUSEADDR binds could otherwise share it)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another ownlm serve?)",
                              hint="stop that process, or pick another port with --port or OWNLM_PORT") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}",
                          hint="check --host/OWNLM_HOST and --port/OWNLM_PORT") from None
    return sock


def node_server(config, on_exit=None):
    """uvicorn's Server, changed for a prompt stop. On SIGTERM/SIGINT `on_exit` runs first (it closes the
    engine: every generation, running or waiting, ends at its next step and streams tell their clients), so
    uvicorn's wait for open responses ends at once. And `run` then returns normally, so the caller's cleanup
    runs (uvicorn re-raises the signal after its shutdown, which would kill the process before it)."""
    import uvicorn

    class NodeServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if on_exit is not None:
                on_exit()  # sets a flag only: safe in a signal handler
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return NodeServer(config)


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
