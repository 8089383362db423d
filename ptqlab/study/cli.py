"""Study sub-commands (``study``, ``report``, ``sensitivity``)."""

from __future__ import annotations

import argparse


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    """Register the study commands on the ``ptqlab`` parser."""
