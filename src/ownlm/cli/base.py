"""What every command module shares: the `cli` group, its Context, the --user option, the console, opening the
store, and the one place where user-facing errors become a single line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys

import click
from rich.console import Console

from ownlm import __version__
from ownlm.errors import OwnlmError
from ownlm.settings import Settings, load_settings

console = Console()


class Context:
    """What every command gets: the global flags, and settings built lazily with per-command overrides."""

    def __init__(self, home: str | None, debug: bool):
        self.home = home
        self.debug = debug

    def settings(self, **overrides: object) -> Settings:
        return load_settings(home=self.home, **overrides)

    @staticmethod
    def user(store, settings: Settings, create: bool = False):
        """The user the command acts for (`--user`, OWNLM_USER, settings.toml, else the home's only user).

        `create`: commands that bring data (import, chat) create a missing user, as `ownlm token create` does.
        """
        return store.resolve_user(settings.user, settings.personalization.privacy_tier if create else None)


pass_ctx = click.make_pass_decorator(Context)


def user_option(f):
    """--user, the same on every command that acts on one user's data."""
    return click.option("--user", metavar="NAME",
                        help="Whose data (default: the home's only user; or set OWNLM_USER).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ownlm")
@click.option("--home", type=click.Path(file_okay=False), help="ownlm home directory (default: $OWNLM_HOME).")
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """ownlm: your conversations become your own language model, on your machine."""
    ctx.obj = Context(home, debug)
    _quiet_libraries(debug)


def _quiet_libraries(debug: bool) -> None:
    """transformers prints progress bars and deprecation chatter that mean nothing to a user."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not user news
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning OwnlmError into one line `error: ... (hint)` and exit code 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="ownlm", standalone_mode=False)
    except OwnlmError as e:
        if debug:
            raise
        click.echo(f"error: {e.message}" + (f" — {e.hint}" if e.hint else ""), err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


def cli_store(settings: Settings):
    """Open the store, asking for the passphrase on a terminal when the store has one and none was given."""
    from ownlm.store import Store
    from ownlm.store.keys import is_passphrase_protected

    passphrase = os.environ.get("OWNLM_PASSPHRASE")
    if passphrase is None and is_passphrase_protected(settings.home) and sys.stdin.isatty():
        passphrase = click.prompt("store passphrase", hide_input=True)
    return Store(settings.home, passphrase)
