"""`ownlm cluster workers`: the Ray cluster's trainers as this node sees them (with `cluster.ray_address` set)."""

from __future__ import annotations

from pathlib import Path

import click

from ownlm.cli.base import Context, cli, pass_ctx
from ownlm.errors import ConfigError


@cli.group()
def cluster() -> None:
    """Rounds as Ray tasks on a cluster (`[cluster]` settings)."""


@cluster.command("workers")
@click.option("--pem-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each worker's signing key to DIR/<node id>.pem, for `ownlm trust add FILE --user NAME`.")
@pass_ctx
def workers(ctx: Context, pem_dir: Path | None) -> None:
    """Every live Ray node: address, CPUs/GPUs, whether it is this machine's and may take tier-1 rounds, whether it
    attests (tier 2), and its trainer's signing key id — trust it for a user before that user's rounds go there."""
    from ownlm.cluster import placement
    from ownlm.cluster.connect import connect

    settings = ctx.settings()
    if not settings.cluster.ray_address:
        raise ConfigError("cluster.ray_address is not set", hint="set it (OWNLM_CLUSTER__RAY_ADDRESS=auto or host:port)")
    found = placement.workers(connect(settings))
    if pem_dir is not None:
        pem_dir.mkdir(parents=True, exist_ok=True)
    for w in found:
        res = w.resources
        here = "this machine" + (", tier 1" if settings.cluster.head_resource in res else "") if w.own_node else "worker"
        click.echo(f"{w.node_id[:12]}  {w.address:<15}  {res.get('CPU', 0):g} CPU {res.get('GPU', 0):g} GPU  {here}  "
                      f"{'attests' if w.identity['attests'] else 'no TEE'}  signs as {w.identity['signer']}")
        if pem_dir is not None:
            (pem_dir / f"{w.node_id}.pem").write_text(w.identity["signing_pem"])
