"""The benchmarks' --smoke switch: the same code paths at tiny sizes, so a broken script shows."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

_UNSET = object()


def parse_with_smoke(
    ap: argparse.ArgumentParser, smoke: dict[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Add --smoke to ``ap`` and parse ``argv``; with --smoke, each option of ``smoke`` (dest ->
    value) that the command line did not give takes its smoke value instead of its default.

    An option counts as given when it is on the command line, even at its default value: a
    namespace that already holds an attribute keeps it unless the command line sets it
    (argparse fills in defaults only for the attributes a namespace lacks).
    """
    ap.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "Tiny sizes (the options not given take the script's smoke values): the same code "
            "paths and figure keys in seconds; a check that it runs, not a measurement."
        ),
    )
    args = ap.parse_args(argv)
    unknown = sorted(set(smoke) - set(vars(args)))
    if unknown:
        raise ValueError(f"smoke sizes for options this parser lacks: {', '.join(unknown)}")
    if not args.smoke:
        return args
    given = ap.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(smoke, _UNSET)))
    for dest, value in smoke.items():
        if getattr(given, dest) is _UNSET:
            setattr(args, dest, value)
    sizes = " ".join(f"{dest}={getattr(args, dest)}" for dest in smoke)
    print(f"smoke run (tiny sizes, figures mean nothing): {sizes}", flush=True)
    return args
