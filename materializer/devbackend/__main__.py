"""``python -m materializer.devbackend``: the local backend on its own (what :class:`DevBackend` starts)."""

from __future__ import annotations

import argparse

from materializer.devbackend.app import run
from materializer.devbackend.options import DESCRIPTION, add_arguments


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m materializer.devbackend", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
