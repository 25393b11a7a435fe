"""``python -m stella_devbackend``: the local backend on its own (what :class:`DevBackend` starts)."""

from __future__ import annotations

import argparse

from stella_devbackend.app import run
from stella_devbackend.options import DESCRIPTION, add_arguments


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stella_devbackend", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
