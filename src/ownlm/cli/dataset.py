"""`ownlm dataset` (build, list) and `ownlm audit` (prove, verify, log): training data and its audit trail."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click
from rich.table import Table

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option
from ownlm.errors import InvalidInput


@cli.group()
def dataset() -> None:
    """Build training data from your stored conversations."""


@dataset.command("build")
@user_option
@click.option("--max-seq-len", type=int, default=512, show_default=True, help="Tokens per example, template included.")
@click.option("--heldout", type=float, default=0.15, show_default=True, help="Share of conversations held out.")
@click.option("--min-examples", type=int, default=10, show_default=True, help="Refuse to build with fewer.")
@click.option("--redact/--no-redact", default=True, show_default=True, help="Replace secrets and PII with placeholders.")
@click.option("--variants/--no-variants", default=True, show_default=True, help="Add last-exchange context variants.")
@click.option("--paraphrases", type=click.IntRange(0, 16), default=3, show_default=True,
              help="Rephrasings of each training example's last question (reply kept); 0 = none.")
@click.option("--reorder/--no-reorder", default=True, show_default=True,
              help="Add each multi-turn training example with its earlier exchanges reordered.")
@pass_ctx
def dataset_build(ctx: Context, user, max_seq_len, heldout, min_examples, redact, variants, paraphrases, reorder) -> None:
    """Turn the user's conversations into examples (targets, edits, redaction, split) with a Merkle root.

    Training examples are augmented (never held-out ones): the last exchange alone, rephrased questions with
    the same reply, and reordered earlier exchanges. Each augmented example names its source example's hash
    and is a leaf of the Merkle root like the others."""
    from ownlm.basemodel import load_tokenizer
    from ownlm.learn.augment import KINDS
    from ownlm.learn.dataset import DatasetConfig, build, config_dict

    settings = ctx.settings(user=user)
    cfg = DatasetConfig(max_seq_len=max_seq_len, heldout_fraction=heldout, min_examples=min_examples,
                        redact=redact, context_variants=variants, paraphrases=paraphrases, reorder_variants=reorder)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        conversations, feedback = store.training_view(u.id)
        if not conversations:
            raise InvalidInput(f"{u.name} has no stored conversations", hint="import a history (`ownlm import`) or chat first")
        with console.status("building the dataset…"):
            built = build(conversations, feedback, load_tokenizer(settings), cfg)
        ds_id = store.save_dataset(u.id, built, config_dict(cfg))
    table = Table(title=f"dataset {ds_id} for {u.name}", show_header=False)
    for key, value in sorted(built.stats.items()):
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("merkle root", built.merkle_root)
    console.print(table)
    kinds = ", ".join(f"{built.stats[f'examples_augmented_{k}']} {k}" for k in KINDS)
    console.print(f"augmented: {built.stats['examples_augmented']} training examples added ({kinds}), "
                  f"from {built.stats['examples_train']} originals")


@dataset.command("list")
@user_option
@pass_ctx
def dataset_list(ctx: Context, user) -> None:
    """List the user's datasets, newest first."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        rows = store.list_datasets(ctx.user(store, settings).id)
    table = Table("id", "created", "train", "held-out", "merkle root")
    for r in rows:
        table.add_row(r["id"], datetime.fromtimestamp(r["created_at"]).isoformat(" ", "seconds"),
                      str(r["n_train"]), str(r["n_heldout"]), r["merkle_root"][:16] + "…")
    console.print(table)


@cli.group()
def audit() -> None:
    """Prove what a model was trained on, and read the audit log."""


@audit.command("prove")
@click.argument("example", type=int)
@click.option("--dataset", "dataset_id", help="Dataset id (default: the latest).")
@user_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the proof here (default: stdout).")
@pass_ctx
def audit_prove(ctx: Context, example: int, dataset_id, user, out) -> None:
    """Print an inclusion proof that EXAMPLE (its index) is in the dataset's Merkle root."""
    from ownlm.learn.merkle import prove

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        info = store.dataset_info(u.id, dataset_id)
        rows = store.dataset_examples(u.id, info["id"])
    if not 0 <= example < len(rows):
        raise InvalidInput(f"example {example} is not in dataset {info['id']}", hint=f"use 0..{len(rows) - 1}")
    proof = prove([r["sha256"] for r in rows], example)
    doc = {"dataset": info["id"], **proof.to_json(), "example": rows[example]["messages"]}
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    if out:
        out.write_text(text)
        click.echo(f"proof for example {example} of {info['id']} written to {out}")
    else:
        click.echo(text)


@audit.command("verify")
@click.argument("proof_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--root", help="Check against this Merkle root (e.g. from a signed manifest) instead of the proof's own.")
def audit_verify(proof_file: Path, root: str | None) -> None:
    """Check a proof: the example's hash and its path must lead to the root. Exit 1 if not."""
    from ownlm.learn.merkle import InclusionProof, verify
    from ownlm.learn.tokens import example_sha256

    try:
        doc = json.loads(proof_file.read_text())
        proof = InclusionProof.from_json(doc)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"{proof_file} is not an ownlm proof ({e})", hint="create one with `ownlm audit prove`") from None
    if doc.get("example") is not None and example_sha256(doc["example"]) != proof.leaf:
        raise InvalidInput("the example's content does not match its hash in the proof", hint="the example was changed")
    if not verify(proof, root):
        raise InvalidInput(f"proof does not lead to root {root or proof.root}", hint="the proof or the root was changed")
    click.echo(f"ok: example {proof.index} is included in {root or proof.root}")


@audit.command("log")
@user_option
@click.option("--limit", type=int, default=50, show_default=True)
@pass_ctx
def audit_log(ctx: Context, user, limit) -> None:
    """What happened to the user's data: imports, datasets, training, deletions (never content)."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        events = store.audit_log(ctx.user(store, settings).id, limit)
    table = Table("when", "action", "detail")
    for e in events:
        table.add_row(datetime.fromtimestamp(e["at"]).isoformat(" ", "seconds"), e["action"], json.dumps(e["detail"]))
    console.print(table)
