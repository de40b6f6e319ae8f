"""Commands on the user's data: `ownlm import`, `ownlm delete`, `ownlm passphrase`, `ownlm audit log`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ownlm.store.imports import import_into
from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option
from ownlm.errors import InvalidInput


@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", help="Export format (default: detected from the file).")
@user_option
@pass_ctx
def import_cmd(ctx: Context, file: Path, fmt: str | None, user: str | None) -> None:
    """Import a chat history export (ChatGPT, Claude, llm logs.db, ShareGPT, OpenAI JSONL, ...)."""
    from ownlm.capture.importers import parse_file

    settings = ctx.settings(user=user)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"reading {file.name}", total=None)
        result = parse_file(file, fmt, progress=lambda done, total: bar.update(task, completed=done, total=total))
        with cli_store(settings) as store:
            u = ctx.user(store, settings, create=True)
            bar.update(task, description="storing", completed=0, total=len(result.conversations))
            counts = import_into(store, u.id, result, file.name, lambda d, t: bar.update(task, completed=d, total=t))
    table = Table(title=f"{file.name} ({result.format}) → {u.name}", show_header=False)
    table.add_row("conversations", f"{counts['conversations_new']} new, {counts['conversations_known']} already stored")
    table.add_row("messages", f"{counts['messages_new']} new, {counts['messages_duplicate']} duplicates")
    for reason, n in sorted(result.skipped.items()):
        table.add_row("skipped", f"{n} × {reason}")
    for bad in result.bad:
        table.add_row("not imported", f"#{bad.index} {bad.external_id or ''}: {bad.reason}")
    console.print(table)


@cli.command()
@click.option("--all", "everything", is_flag=True, help="Delete all of the user's conversations.")
@click.option("--before", help="Delete messages created before this date (YYYY-MM-DD or ISO 8601).")
@click.option("--conversation", help="Delete one conversation by id.")
@user_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--keep-models", is_flag=True,
              help="Keep the installed models trained on the deleted data (default: they are removed too).")
@pass_ctx
def delete(ctx: Context, everything: bool, before: str | None, conversation: str | None, user: str | None, yes: bool,
           keep_models: bool) -> None:
    """Right to delete: remove conversations for good, and the models trained on them (the audit log keeps
    counts and ids, never content)."""
    if sum([everything, before is not None, conversation is not None]) != 1:
        raise InvalidInput("say what to delete", hint="give exactly one of --all, --before DATE, --conversation ID")
    when = None
    if before is not None:
        try:
            when = datetime.fromisoformat(before).timestamp()
        except ValueError:
            raise InvalidInput(f"--before {before!r} is not a date", hint="use YYYY-MM-DD or ISO 8601") from None
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        stats = store.stats(u.id)
        what = "ALL conversations" if everything else (f"messages before {before}" if before else f"conversation {conversation}")
        if not yes:
            models = store.delete_preview(u.id, before=when, conversation_id=conversation)["models"]
            also = (f" The {len(models)} model(s) trained on it ({', '.join(models)}) "
                    f"{'are kept' if keep_models else 'go too'}." if models else "")
            click.confirm(f"Delete {what} of {u.name} (holds {stats['conversations']} conversations, "
                          f"{stats['messages']} messages)?{also} This cannot be undone", abort=True)
        res = store.delete_data(u.id, before=when, conversation_id=conversation, keep_models=keep_models)
        from ownlm.privacy.fedretire import after_delete

        notice = after_delete(store, settings, u, res)
    click.echo(f"deleted {res['messages']} messages in {res['conversations']} conversations of {u.name}, "
               f"and their {res['memory_passages']} memory passages")
    if res["models_removed"]:
        click.echo(f"removed the models trained on them: {', '.join(res['models_removed'])}")
    for owner, ids in (res.get("models_removed_elsewhere") or {}).items():
        click.echo(f"removed the models of user id {owner} "
                   f"merged from them: {', '.join(ids)}")
    if res["models_kept"]:
        click.echo(f"kept, as asked, the models trained on them: {', '.join(res['models_kept'])}")
    if res["models_removed"] or res["models_kept"]:
        click.echo(f"now serving {res['active_model'] or 'the base model'}")
    if notice is not None:
        click.echo(f"your other devices still hold the aggregate of federated round(s) {', '.join(res['federation_rounds'])}, "
                   f"which learned from this data: wrote retire notice {notice}; copy it to each of them and run "
                   f"`ownlm federate retire FILE --user {u.name}` there")


@cli.group()
def passphrase() -> None:
    """Protect the store key with a passphrase, or go back to a key file."""


@passphrase.command("set")
@pass_ctx
def passphrase_set(ctx: Context) -> None:
    """Wrap the store key with a (new) passphrase (Argon2id + AES-256-GCM); the key file is removed."""
    with cli_store(ctx.settings()) as store:
        new = click.prompt("new passphrase", hide_input=True, confirmation_prompt=True)
        if len(new) < 8:
            raise InvalidInput("passphrase too short", hint="use at least 8 characters")
        store.protect_key(new)
    click.echo("the store key is now protected by the passphrase; set OWNLM_PASSPHRASE to start the node unattended")


@passphrase.command("remove")
@pass_ctx
def passphrase_remove(ctx: Context) -> None:
    """Keep the store key in a 0600 key file again (no passphrase needed to start)."""
    with cli_store(ctx.settings()) as store:
        store.protect_key(None)
    click.echo("the store key is now kept in store.key (mode 0600)")
