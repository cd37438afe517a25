"""`vis` subcommands for CAMs and occlusion."""
from __future__ import annotations


def register(sub, add_input) -> None:
    """Add this family's subcommands to the `vis` parser."""
