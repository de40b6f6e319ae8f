"""`ownlm federate`: federated rounds across one person's devices (privacy/federation.py, Flower 1.42).

    laptop$ ownlm federate server --user me --devices 2 --join --host 192.168.1.5   # prints its CA file (TLS)
    phone$  ownlm federate join --user me --superlink 192.168.1.5:9091 --ca laptop-ca.pem

Before the first round each device trusts the others' signing keys for the user (updates are signed with the
device's key, the aggregate with the server's): `ownlm keys public --user me > laptop.pem` on each device, then
`ownlm trust add laptop.pem --user me` on the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option


@cli.group()
def federate() -> None:
    """Federated rounds: each of your devices trains on its own conversations, only adapter updates travel."""


@federate.command("server")
@user_option
@click.option("--devices", type=int, default=2, show_default=True, help="Devices (SuperNodes) the round waits for.")
@click.option("--min-devices", type=int, default=0, help="Valid updates needed to aggregate (default: --devices).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the SuperLink binds (a LAN address to reach your other devices at home).")
@click.option("--port", type=int, default=9091, show_default=True, help="The SuperLink's port.")
@click.option("--method", type=click.Choice(["factors", "product", "latent"]),
              help="latent (the default with quantization-aware training): mean of the latent weights and scales; "
                   "factors (the default without): FedAvg of A and B; product: mean of B·A re-factorised by SVD. "
                   "bench/federated.py: latent was the only one to match the devices' own models.")
@click.option("--steps", type=int, help="Training steps on each device (default: personalization.max_steps).")
@click.option("--lr", type=float, help="Learning rate on each device (default: personalization.lr).")
@click.option("--epsilon", type=float, help="Ask every device to train its update with DP-SGD at most this epsilon "
              "(per conversation). Without it, devices at tier 0 still always do (personalization.federation_dp).")
@click.option("--wait", "wait_s", type=float, default=300, show_default=True, help="Seconds to wait for the devices.")
@click.option("--timeout", "timeout_s", type=float, default=3600, show_default=True,
              help="Seconds the devices may take to train (and then to install).")
@click.option("--secure", is_flag=True, help="Devices encrypt their updates to your CKKS key and this server only adds "
              "ciphertexts (privacy/securefed.py); required for devices at tier 3. Every device needs the key "
              "(`ownlm federate key`).")
@click.option("--join", "join_self", is_flag=True, help="Also take part with this home's conversations (a SuperNode here).")
@click.option("--no-gate", is_flag=True, help="With --join: install the aggregate here without this device's quality gate.")
@click.option("--insecure", is_flag=True, help="Plain HTTP instead of TLS (updates stay signed and bundles sealed, but "
              "the network sees the round's metadata and DP-noised updates).")
@click.option("--tls-name", "tls_names", multiple=True, help="A name or address the devices dial, for the TLS "
              "certificate (repeatable; --host, 127.0.0.1 and localhost are always in it).")
@pass_ctx
def server(ctx: Context, user, devices, min_devices, host, port, method, steps, lr, epsilon, wait_s, timeout_s, secure,
           join_self, no_gate, insecure, tls_names) -> None:
    """Run one federated round: start a SuperLink, wait for the devices, aggregate, install on every device."""
    from ownlm.privacy import federation as fed
    from ownlm.privacy.fedupdate import new_round_id

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
    p = settings.personalization
    address = f"{host}:{port}"
    tls = None
    if not insecure:
        from ownlm.privacy.fedtls import server_tls

        tls = server_tls(settings.home, [host, *tls_names])
        console.print(f"TLS: devices join with --ca {tls.ca} (sha256 {tls.ca_sha256()}; copy the file, compare the hash)")
    dial = address if host not in ("0.0.0.0", "::") else f"127.0.0.1:{port}"  # how this machine reaches its SuperLink
    procs = [fed.start_superlink(settings.home, host=host, port=port, tls=tls)]
    ca = tls.ca if tls else None
    try:
        fed.wait_port(dial.rsplit(":", 1)[0], port)
        if join_self:
            procs.append(fed.start_supernode(settings.home, dial, u.name, port=port + 3, gate=not no_gate, ca=ca))
        round_id = new_round_id()
        console.print(f"federation round {round_id} for {u.name} on {address}: waiting for {devices} device(s)…")
        result = fed.run_round(settings.home, dial, {
            **fed.RUN_CONFIG, "home": str(settings.home), "user": u.name, "round": round_id, "devices": devices,
            "min_devices": min_devices, "method": method or ("latent" if p.qat else "factors"), "lr": lr if lr is not None else p.lr,
            "max_steps": steps if steps is not None else (p.max_steps or 0), "epochs": p.epochs, "qat": p.qat, "anchor_kl": p.anchor_kl,
            "dp_epsilon": epsilon or 0.0,
            "wait_s": wait_s, "timeout_s": timeout_s, "secure": secure}, timeout_s=wait_s + 2 * timeout_s + 120, ca=ca)
    finally:
        for proc in reversed(procs):
            proc.stop()
    click.echo(json.dumps(result, indent=1))
    if result.get("state") != "installed":
        raise click.ClickException(f"the round did not install everywhere: {result.get('error') or result.get('state')}")


@federate.command("join")
@user_option
@click.option("--superlink", required=True, help="HOST:PORT of the federation server's SuperLink.")
@click.option("--port", type=int, default=9094, show_default=True, help="This SuperNode's local port (127.0.0.1).")
@click.option("--no-gate", is_flag=True, help="Install the aggregate without judging it on this device's held-out data.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's federation CA certificate (the ca.pem `ownlm federate server` printed): TLS, verified.")
@click.option("--insecure", is_flag=True, help="Plain HTTP, for a server started with --insecure.")
@pass_ctx
def join(ctx: Context, user, superlink, port, no_gate, ca, insecure) -> None:
    """Take part in federated rounds until interrupted: train here, send only the signed adapter update."""
    from ownlm.errors import InvalidInput
    from ownlm.privacy import federation as fed
    from ownlm.privacy.fedtls import check_ca_file
    from ownlm.privacy.tiers import check_may_send_update

    if (ca is None) == (not insecure):
        raise InvalidInput("say how to reach the server", hint="give --ca FILE (the server's ca.pem: TLS) or --insecure")
    ca = check_ca_file(ca) if ca is not None else None
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        tier = store.get_user(u.id).privacy_tier
        # refuse before connecting at all; at tier 3 the device itself sends only encrypted updates (make_update)
        check_may_send_update(tier, superlink, secure=tier == 3)
    proc = fed.start_supernode(settings.home, superlink, u.name, port=port, gate=not no_gate, ca=ca)
    console.print(f"joined {superlink} as {u.name} (log: {proc.log_path}); Ctrl-C to leave")
    try:
        proc.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()


@federate.group("key")
def key() -> None:
    """Your tier-3 (CKKS) key pair, the same on every device; the federation server never gets its secret half."""


@key.command("init")
@user_option
@pass_ctx
def key_init(ctx: Context, user) -> None:
    """Make your key pair on this device (once, on the first device), or show the one it has."""
    from ownlm.privacy.securefed import init_keys

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        keys = init_keys(store, ctx.user(store, settings))
    click.echo(json.dumps({"key_id": keys.key_id, "public_bytes": len(keys.public)}))


@key.command("export")
@user_option
@click.option("--to", "recipient", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The other device's node public key JSON (`ownlm node pubkey` there).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The key file to write.")
@pass_ctx
def key_export(ctx: Context, user, recipient: Path, out: Path) -> None:
    """Seal your key pair to another of your devices (only that device can open the file)."""
    from ownlm.errors import InvalidInput
    from ownlm.fsutil import atomic_write
    from ownlm.privacy.securefed import export_keys

    try:
        doc = json.loads(recipient.read_text())
    except ValueError as e:
        raise InvalidInput(f"{recipient} is not JSON ({e})", hint="pass the output of `ownlm node pubkey`") from None
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        data = export_keys(store, ctx.user(store, settings), doc)
    atomic_write(out, data)
    console.print(f"wrote {out} ({len(data):,} bytes), sealed to {doc.get('key_id')}")


@key.command("import")
@user_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def key_import(ctx: Context, user, path: Path) -> None:
    """Keep the key pair another of your devices sealed to this one (its signing key must be trusted here)."""
    from ownlm.privacy.securefed import import_keys

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        kid = import_keys(store, ctx.user(store, settings), path.read_bytes())
    click.echo(json.dumps({"key_id": kid}))


@federate.command("retire")
@user_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def retire(ctx: Context, user, path: Path) -> None:
    """Remove the federated aggregates that another of your devices retired after you deleted data there (the
    notice `ownlm delete` wrote on it; signed with a key this device trusts for the user)."""
    from ownlm.privacy.fedretire import apply_notice

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        res = apply_notice(store, ctx.user(store, settings), path.read_bytes())
    gone = ", ".join(res["models_removed"]) or "none (this device did not hold them)"
    click.echo(f"retired round(s) {', '.join(res['rounds'])} (notice from device {res['device']}): removed {gone}; "
               f"now serving {res['active_model'] or 'the base model'}")
