"""Personal model artifacts and the node: `bundle`, `deploy`, `models`, `rollback`, `node`, `keys`, `trust`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click
from rich import box
from rich.table import Table

from ownlm.artifact.manifest import dp_summary
from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option
from ownlm.errors import InvalidInput


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read {what} {path}: {e}", hint=f"pass a {what} JSON file") from None


@cli.command()
@click.argument("delta_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--report", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The training report.json.")
@click.option("--to", "recipient", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The node's public key JSON (`ownlm node pubkey`); default: this home's node.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .ownlm file to write.")
@user_option
@click.option("--version", "version", type=int, help="Version number (default: newest installed here + 1).")
@pass_ctx
def bundle(ctx: Context, delta_dir: Path, report: Path, recipient: Path | None, out: Path, user, version) -> None:
    """Sign a compressed delta with the user's key and seal it to a node (ML-KEM-768 + X25519)."""
    from ownlm.artifact.bundle import make_bundle
    from ownlm.basemodel import resolve_base

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        pub = _read_json(recipient, "node public key") if recipient else store.node_key().public_json()
        latest = store.models(u.id)
        data, manifest = make_bundle(
            delta_dir=delta_dir, report=_read_json(report, "training report"), user_name=u.name,
            signing_key=store.signing_key(u.id), recipient=pub, base_name=resolve_base(settings.base).name,
            version=version or store.max_version(u.id) + 1, previous=latest[0]["id"] if latest else None,
        )
    out.write_bytes(data)
    console.print(f"{out}: {manifest['model']['id']} v{manifest['versioning']['version']}, {len(data):,} bytes, "
                  f"signed by {manifest['signature']['key_id']}, sealed to node {pub['key_id']}")


@cli.command()
@click.argument("bundle_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--node", "node_url", help="Push to this node's URL (default: install into this home).")
@click.option("--token", envvar="OWNLM_TOKEN", help="Bearer token for --node (or OWNLM_TOKEN).")
@click.option("--rollback", is_flag=True, help="Allow a version that is not newer (an explicit rollback).")
@pass_ctx
def deploy(ctx: Context, bundle_file: Path, node_url: str | None, token: str | None, rollback: bool) -> None:
    """Verify and install a bundle, then route its user to it."""
    data = bundle_file.read_bytes()
    if node_url:
        import httpx

        if not token:
            raise InvalidInput("--node needs a token", hint="pass --token or set OWNLM_TOKEN")
        r = httpx.post(f"{node_url.rstrip('/')}/api/personalization/deploy", content=data, params={"rollback": rollback},
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}, timeout=120)
        body = r.json()
        if r.status_code != 200:
            err = body.get("error", {})
            raise InvalidInput(f"the node refused the bundle: {err.get('message')}", hint=err.get("hint"))
        console.print(f"deployed {body['model_id']} (v{body['version']}) to {node_url} in {body['seconds']:.3f} s")
        return
    from ownlm.node.install import install

    settings = ctx.settings()
    with cli_store(settings) as store:
        res = install(store, settings, data, rollback=rollback)
    console.print(f"installed {res.model_id} (v{res.version}), signed by {res.signer}, in {res.seconds:.3f} s; now active")


@cli.command("models")
@click.argument("model", nargs=-1)
@user_option
@pass_ctx
def models_cmd(ctx: Context, model: tuple[str, ...], user) -> None:
    """List the user's installed models; `ownlm models [show] ID` (id or version) shows its manifest."""
    if model[:1] == ("show",):
        model = model[1:]
    if len(model) > 1:
        raise InvalidInput("give one model id or version", hint="ownlm models show ID")
    model = model[0] if model else None
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        trusted = store.signers_for(u.id)  # keys that may sign for this user, now
        rows = [store.model(u.id, model)] if model else store.models(u.id)
    if model:
        m = rows[0]
        console.print(f"[bold]{m['id']}[/] (active: {'yes' if m['active'] else 'no'}; signature: "
                      f"{'verified, trusted key ' + m['signer'] if m['signer'] in trusted else 'signer no longer trusted'})")
        _show(m["manifest"])
        return
    # An id is what `ownlm models show` and `ownlm rollback` take: it is never cut or wrapped; on a narrow
    # terminal the other columns wrap instead (a light box leaves them room at 80 columns).
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("v", justify="right", overflow="fold")
    table.add_column("id", no_wrap=True, min_width=max((len(m["id"]) for m in rows), default=2))
    for header in ("installed", "size", "held-out loss base → personal", "DP", "signature", "active"):
        table.add_column(header, overflow="fold")
    for m in rows:
        t = m["manifest"].get("training", {})
        loss = f"{t.get('heldout_loss_base') or 0:.3f} → {t.get('heldout_loss_personal') or 0:.3f}"
        if isinstance(merged := m["manifest"].get("merge"), dict):  # a merge (node/merge.py) has no held-out loss
            loss = f"merged ({merged.get('method')}) from " + ", ".join(
                f"{s.get('user')} v{s.get('version')}" for s in merged.get("sources") or [] if isinstance(s, dict))
        table.add_row(str(m["version"]), m["id"], datetime.fromtimestamp(m["installed_at"]).isoformat(" ", "minutes"),
                      f"{m['size_bytes'] / 1000:.1f} KB", loss, dp_summary(m["manifest"]) or "off",
                      "verified" if m["signer"] in trusted else "untrusted",
                      "●" if m["active"] else "")
    console.print(table if rows else "no personal model installed: the base model answers")


def _show(obj, indent: int = 0) -> None:
    """YAML-like rendering of a manifest."""
    for key, value in obj.items():
        if isinstance(value, dict):
            console.print(" " * indent + f"{key}:", highlight=False)
            _show(value, indent + 2)
        else:
            console.print(" " * indent + f"{key}: {value}", highlight=False, soft_wrap=True)


@cli.command("rollback")
@click.argument("target", required=False)
@user_option
@pass_ctx
def rollback_cmd(ctx: Context, target: str | None, user) -> None:
    """Serve an earlier version (default: the one before the active one), or TARGET=base for the base model."""
    from ownlm.node.install import rollback

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        m = rollback(store, ctx.user(store, settings).id, target)
    console.print(f"now serving {m['id']} (v{m['version']})" if m else "now serving the base model")


@cli.group()
def node() -> None:
    """This node's identity."""


@node.command("pubkey")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
@pass_ctx
def node_pubkey(ctx: Context, out: Path | None) -> None:
    """The node's public key (ML-KEM-768 + X25519) that trainers seal bundles to."""
    with cli_store(ctx.settings()) as store:
        text = json.dumps(store.node_key().public_json(), indent=1)
    out.write_text(text) if out else click.echo(text)


@cli.group()
def keys() -> None:
    """The users' signing keys."""


@keys.command("public")
@user_option
@click.option("--alg", type=click.Choice(["ed25519", "ecdsa-p256"]), default="ed25519", show_default=True,
              help="Algorithm of a key created now (an existing key keeps its own).")
@pass_ctx
def keys_public(ctx: Context, user, alg) -> None:
    """Print the user's public signing key (PEM), creating the key pair on first use."""
    from ownlm.artifact.sign import public_pem

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        click.echo(public_pem(store.signing_key(ctx.user(store, settings, create=True).id, alg)), nl=False)


@cli.group()
def trust() -> None:
    """Signers whose models this node accepts."""


@trust.command("add")
@click.argument("pem_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--label", help="Who this key belongs to.")
@click.option("--user", "--for-user", "user", help="The user whose models this key may sign (default: the settings' user).")
@pass_ctx
def trust_add(ctx: Context, pem_file: Path, label, user) -> None:
    """Trust the public key in PEM_FILE (from `ownlm keys public` on the trainer) to sign one user's models."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        kid = store.trust(pem_file.read_text(), label, user_id=u.id)
    click.echo(f"trusted {kid} for {u.name}")


@trust.command("list")
@pass_ctx
def trust_list(ctx: Context) -> None:
    """List trusted signing keys and the users each may sign for."""
    with cli_store(ctx.settings()) as store:
        rows = store.list_trusted()
    table = Table("key id", "alg", "label", "signs for")
    for r in rows:
        table.add_row(r["key_id"], r["alg"], r["label"] or "", ", ".join(r["users"]) or "(no one)")
    console.print(table)
