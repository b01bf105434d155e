"""The ``xytune`` command line (typer + rich).

Every user error is one red sentence and exit code 2; a regression found by
``compare`` is exit code 1; an interrupted profile saves its partial table
and exits 130.
"""

from . import bench, check, export, profile, serve, tune  # noqa: F401  (each module registers its commands on ``app``)
from .app import app, main

__all__ = ["app", "main"]
