"""Argument types of the command line, one place for all commands: each turns a bad value into argparse's one-line
usage error (`error: argument --x: expected ...`, exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import math


def _integer(text: str, least: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = least - 1
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return n


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def index(text: str) -> int:
    return _integer(text, 0, "an integer 0 or more")


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def seconds(text: str, *, zero: bool = False) -> float:
    """A duration under 10^6 s (0 allowed with `zero`)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not ((0 <= x if zero else 0 < x) and x < 1e6):
        raise argparse.ArgumentTypeError(f"expected a {'' if zero else 'positive '}number of seconds, got {text!r}")
    return x


def port(text: str) -> int:
    n = positive_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {text!r}")
    return n
