"""The `dmae` command line: the Typer app with every command registered, and `main`.

Each command lives in its own module of `dmae_cli.cli` and registers itself on the app of
`dmae_cli.cli.base` when imported; importing them all here makes this module the complete
command line (the console script, `dmae_cli.__main__:main`, calls `main` here after the CPU
thread settings).
"""

from __future__ import annotations

from dmae_cli.cli.base import app

# Importing a command module registers its command: this order is the order of --help.
# isort: off
from dmae_cli.cli import pretrain, finetune, certify, predict, import_, report, demo, plugins, shard
# isort: on

COMMANDS = (pretrain, finetune, certify, predict, import_, report, demo, plugins, shard)
__all__ = ["COMMANDS", "app", "main"]


def main() -> None:
    app()
