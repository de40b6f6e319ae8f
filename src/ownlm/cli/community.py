"""`ownlm community`: the opt-in community model (privacy/community.py). Both choices are off by default.

    ownlm community join      # contribute DP-noised, pairwise-masked updates to community rounds (tiers 0 and 3)
    ownlm community leave     # stop contributing
    ownlm community start on  # let my first round start from the node's community adapter (off: from scratch)
    ownlm community status
"""

from __future__ import annotations

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option


@cli.group()
def community() -> None:
    """The community model: a shared adapter from many users' DP-noised, securely summed updates (opt-in)."""


def _show(choice: dict) -> None:
    console.print(f"contributing: {'yes' if choice['contribute'] else 'no'}; "
                  f"first round starts from the community model: {'yes' if choice['start'] else 'no'}")


@community.command("join")
@user_option
@pass_ctx
def community_join(ctx: Context, user) -> None:
    """Contribute to community rounds (tiers 0 and 3 only; recorded in the audit log)."""
    from ownlm.privacy.community import set_choice

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        _show(set_choice(store, ctx.user(store, settings), contribute=True))


@community.command("leave")
@user_option
@pass_ctx
def community_leave(ctx: Context, user) -> None:
    """Stop contributing (recorded in the audit log)."""
    from ownlm.privacy.community import set_choice

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        _show(set_choice(store, ctx.user(store, settings), contribute=False))


@community.command("start")
@click.argument("choice", type=click.Choice(["on", "off"]))
@user_option
@pass_ctx
def community_start(ctx: Context, choice: str, user) -> None:
    """Whether your first round starts from the node's community adapter (on) or from scratch (off)."""
    from ownlm.privacy.community import set_choice

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        _show(set_choice(store, ctx.user(store, settings), start=choice == "on"))


@community.command("status")
@user_option
@pass_ctx
def community_status(ctx: Context, user) -> None:
    """Your choices, and the node's community model (round, participants, ε of each contribution)."""
    from ownlm.errors import NotFound
    from ownlm.privacy.community import current

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        _show(store.community(ctx.user(store, settings).id))
        try:
            manifest, _ = current(store, settings)
            eps = ", ".join(f"{e:g}" for e in manifest["epsilons"])
            console.print(f"community model: round {manifest['round']}, {manifest['participants']} participants, ε = {eps}")
        except NotFound:
            console.print("community model: none on this node yet")
