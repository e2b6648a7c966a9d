"""The ``vtd-emu`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("vtd-emu: no command yet", file=sys.stderr)
    return 2
