"""`ownlm trainer`: run this machine as a remote trainer for nodes on privacy tier 0 (or 2, inside a TEE)."""

from __future__ import annotations

import click

from ownlm.cli.base import Context, cli, console, pass_ctx
from ownlm.cli.model import model_options


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8443, show_default=True, help="Port.")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), required=True,
              help="PEM certificate (chain) for TLS; nodes verify it against their remote.ca_file.")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), required=True, help="PEM private key for TLS.")
@pass_ctx
def trainer(ctx: Context, base, device, host, port, ssl_certfile, ssl_keyfile) -> None:
    """Serve POST /trainer/jobs over TLS: train sealed jobs, answer with signed bundles sealed to the node."""
    import uvicorn

    from ownlm.api.trainer_app import create_trainer_app
    from ownlm.privacy.trainer import Trainer

    settings = ctx.settings(base=base, device=device)
    t = Trainer(settings)
    console.print(f"ownlm trainer on https://{host}:{port} — base sha256 {t.base.sha256[:16]}…")
    console.print("nodes must trust this signing key for each user it trains (`ownlm trust add FILE --user NAME`):\n" + t.signing_key_pem())
    uvicorn.run(create_trainer_app(t), host=host, port=port, log_level="warning",
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
