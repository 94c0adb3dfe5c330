"""Command-line value checkers and readers shared by every `jaxdit` subcommand's parser.

Each checker is an argparse `type=`: a bad value is refused by the parser, which names the flag
("argument --steps: expected a positive integer, got '0'"); the readers refuse a file in one line naming
the flag and the path.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """A command line the parser refuses; the message is the whole line to print."""


class Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line ("jaxdit generate: error: argument --steps: ...") instead of
    the usage text, raised so `main` returns status 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _number(parse, ok, expected: str):
    """An argparse `type=` refusing values outside `ok`; argparse puts the flag's name before the message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2 ** 32, "a seed in [0, 2^32)")
finite_float = _number(float, math.isfinite, "a finite number")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
fraction_below_one = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def read_text(path, flag: str) -> str:
    """A UTF-8 text file given by `flag`; a missing, unreadable or non-UTF-8 file is refused naming both."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None


def read_prompt_lines(path, flag: str) -> list[str]:
    """The non-blank lines, stripped, of the text file given by `flag` (one prompt per line); refused in one
    line when there are none."""
    prompts = [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} {path}: no prompts (one per line)")
    return prompts


def read_image(path, flag: str = "--image"):
    """An RGB PIL image given by `flag`; refused in one line naming it when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{flag} {path}: cannot read an image ({e})") from None
