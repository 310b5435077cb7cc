"""`facegate`: the command line. Commands call the same core functions as the HTTP routes (`app.service`, and
`app.evaluate` / `app.grouping` for the commands that need no gallery: eval, cluster, calibrate without --apply).

Settings come from the environment (FACEGATE_*), as for the server. Only the commands print; the core logs.
Exit status: 0 success (for `verify`: a match), 1 a negative answer (`verify`: no match) or some photos failed
(`enroll`), 2 an error.

One module per group of commands: serve, keys, people (enroll / verify / identify), evaluation (eval /
eval-identify / calibrate), cluster, train (train / reindex), db; `common` holds what they share.
"""

from __future__ import annotations

# Importing the command modules registers their commands on `cli`, in the order `facegate --help` lists them.
# isort: off
from app.cli import serve  # noqa: F401
from app.cli import keys  # noqa: F401
from app.cli import people  # noqa: F401
from app.cli import evaluation  # noqa: F401
from app.cli import cluster  # noqa: F401
from app.cli import train  # noqa: F401
from app.cli import db  # noqa: F401
# isort: on
from app.cli.common import cli
from app.cli.serve import api_keys_configured, share_cores

__all__ = ["api_keys_configured", "cli", "main", "share_cores"]


def main() -> None:
    cli()
