"""The `ownlm` command line: one module per command group, each registering its commands on the `cli` group of
cli/base.py when imported here. `main` is the entry point (pyproject's `ownlm` script)."""

from ownlm.cli import bitdelta, cluster, community, dataset, export, federate, loop, memory, merge, model, models, serve, store, trainer  # noqa: F401  (registration)
from ownlm.cli.base import cli, main

__all__ = ["cli", "main"]
