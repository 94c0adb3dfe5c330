"""Experiment files: one TOML file per measured run (`experiments/`), re-run with `--config FILE`.

    command = "jaxdit toyworld train"      # the entry point; for `jaxdit`, with its sub-command
    description = "what was measured, in one line"
    recorded_in = ["toyworld/weights/training.json", "benchmarks/RESULTS.md"]   # optional
    [args]                                 # option values keyed by the option's dest name
    seed = 2
    t2i_batch = 40
    no_progress = true                     # a flag (store_true): true or false
    shape = ["48:8:6:4096", "256:16:32:4096"]   # a repeatable option (or one taking several values)

`expand(parser, argv, entry)` puts the file's options where `--config FILE` stands in `argv`, so any flag
given after it overrides them (argparse keeps the last value); for `jaxdit` the file's sub-command comes
with them. Everything is checked before any work, against the parser's own actions (dest names, value
types, choices): a problem is an `ExperimentError`, one line naming the file and the key at fault.
`parse_args(parser, argv, entry)` is the call a script's `main` makes: it adds `--config` to the parser,
expands and parses, and prints such an error as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from dataclasses import dataclass, field

KEYS = ("command", "description", "recorded_in", "args")
FLAG = "--config"


class ExperimentError(ValueError):
    """An experiment file (or its use) refused; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Experiment:
    path: str
    command: str
    description: str
    recorded_in: tuple[str, ...] = ()
    args: dict = field(default_factory=dict)


def load(path) -> Experiment:
    """The experiment file at `path`, its keys and their types checked (not yet against a parser)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such experiment file") from None
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExperimentError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    for key in data:
        if key not in KEYS:
            raise ExperimentError(f"{path}: {key}: unknown key (expected {', '.join(KEYS)})")
    for key in ("command", "description"):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise ExperimentError(f"{path}: {key}: expected a one-line string, got {value!r}")
    recorded = data.get("recorded_in", [])
    if not isinstance(recorded, list) or not all(isinstance(r, str) for r in recorded):
        raise ExperimentError(f"{path}: recorded_in: expected a list of file names, got {recorded!r}")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise ExperimentError(f"{path}: args: expected a table of option values, got {args!r}")
    return Experiment(path, data["command"].strip(), data["description"].strip(), tuple(recorded), args)


def _subparsers(parser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def target(experiment: Experiment, parser, entry: str):
    """(sub-command words, the parser they lead to): `command` must be `entry` followed by a full path of
    sub-commands of `parser` ('jaxdit toyworld train'), or `entry` itself for a parser without any."""
    words, head = experiment.command.split(), entry.split()
    if words[:len(head)] != head:
        run = f"python {words[0]}" if words[0].endswith(".py") else words[0]
        raise ExperimentError(f"{experiment.path}: command: {experiment.command!r} is not run by {entry} "
                              f"(run it with: {run} --config {experiment.path})")
    rest, path = words[len(head):], list(head)
    for word in rest:
        sub = _subparsers(parser)
        if sub is None:
            raise ExperimentError(f"{experiment.path}: command: {experiment.command!r}: "
                                  f"{' '.join(path)} takes no sub-command {word!r}")
        if word not in sub.choices:
            raise ExperimentError(f"{experiment.path}: command: {experiment.command!r}: {' '.join(path)} has no "
                                  f"sub-command {word!r} (expected one of {', '.join(sub.choices)})")
        parser, path = sub.choices[word], path + [word]
    sub = _subparsers(parser)
    if sub is not None and sub.required:
        raise ExperimentError(f"{experiment.path}: command: {experiment.command!r} names no sub-command of "
                              f"{' '.join(path)} (expected one of {', '.join(sub.choices)})")
    return rest, parser


def _tokens(where: str, action, value) -> list[str]:
    """The command-line tokens giving `value` to `action`, the value checked as the parser would."""
    flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0]) \
        if action.option_strings else None
    name = flag or action.dest
    if isinstance(value, dict):
        raise ExperimentError(f"{where}: a table is not a value of {name}")
    if action.nargs == 0:  # store_true / store_false / store_const / count / BooleanOptionalAction
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ExperimentError(f"{where}: {name} is counted: expected an integer >= 0, got {value!r}")
            return [flag] * value
        if not isinstance(value, bool):
            raise ExperimentError(f"{where}: {name} is a flag: expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag] if value else [o for o in action.option_strings if o.startswith("--no-")][:1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return [flag] if value == action.const else []  # store_false: `false` gives the flag
        return [flag] if value else []
    if action.nargs == "?" and isinstance(value, bool):
        return [flag] if value else []  # true: the flag alone (its const)
    repeated = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
    several = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    if repeated or several:
        if not isinstance(value, list) or action.nargs == "+" and not value:
            raise ExperimentError(f"{where}: {name} is repeatable: expected a list of values, got {value!r}")
        values = value
    elif isinstance(value, list):
        raise ExperimentError(f"{where}: {name} takes one value, got a list")
    else:
        values = [value]
    texts = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ExperimentError(f"{where}: expected a string or a number for {name}, got {v!r}")
        text = str(v)
        convert = action.type if callable(action.type) else str
        try:
            converted = convert(text)
        except argparse.ArgumentTypeError as e:
            raise ExperimentError(f"{where}: {e}") from None
        except (TypeError, ValueError):
            raise ExperimentError(f"{where}: invalid {getattr(convert, '__name__', 'value')} value for {name}: "
                                  f"{text!r}") from None
        if action.choices is not None and converted not in action.choices:
            raise ExperimentError(f"{where}: {text!r} is not a choice of {name} "
                                  f"(expected one of {', '.join(map(str, action.choices))})")
        texts.append(text)
    if flag is None:
        return texts
    if repeated and not several:
        return [f"{flag}={t}" for t in texts]
    return [flag, *texts] if several else [f"{flag}={texts[0]}"]


def to_argv(experiment: Experiment, parser, entry: str) -> list[str]:
    """The sub-command words and option tokens `experiment` stands for, checked against `parser` (the
    entry's parser): every key of [args] a dest of the command's parser, every value one it accepts."""
    words, leaf = target(experiment, parser, entry)
    own = next((a for a in parser._actions if FLAG in a.option_strings), None)
    actions = {}
    for a in leaf._actions:
        if a.dest != argparse.SUPPRESS and a is not own and not isinstance(a, argparse._SubParsersAction):
            actions.setdefault(a.dest, a)
    positional, optional = [], []
    for key, value in experiment.args.items():
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            raise ExperimentError(f"{experiment.path}: args.{key}: no such option of {experiment.command}"
                                  + (f" (did you mean {close[0]}?)" if close else ""))
        action = actions[key]
        (optional if action.option_strings else positional).extend(
            _tokens(f"{experiment.path}: args.{key}", action, value))
    return words + positional + optional


def _find(parser, argv: list[str]):
    """(end, FILE) of `--config FILE` among the tokens that are `parser`'s own (before its sub-command;
    `end` the index after it), or None."""
    sub = _subparsers(parser)
    found = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--" or sub is not None and token in sub.choices:
            break
        if token == FLAG or token.startswith(FLAG + "="):
            end, path = (i + 2, argv[i + 1] if i + 1 < len(argv) else None) if token == FLAG \
                else (i + 1, token.split("=", 1)[1])
            if path is None:
                return None  # argparse says "expected one argument"
            if found is not None:
                raise ExperimentError(f"{FLAG}: given twice ({found[1]}, {path}); one experiment file at a time")
            found = (end, path)
            i = end
            continue
        i += 1
    return found


def expand(parser, argv, entry: str) -> list[str]:
    """`argv` with `--config FILE` followed by the file's sub-command words and options (checked against
    `parser`, whose command is `entry`); the tokens after it, the user's overrides, still follow them."""
    argv = list(argv)
    found = _find(parser, argv)
    if found is None:
        return argv
    end, path = found
    return argv[:end] + to_argv(load(path), parser, entry) + argv[end:]


def add_option(parser, dest: str = "config") -> None:
    """`--config FILE` in `parser`'s help (its value lands in `dest`)."""
    parser.add_argument(FLAG, dest=dest, metavar="EXPERIMENT.toml",
                        help="run an experiment file (experiments/): its options, then any given after it, "
                             "which override them")


def parse_args(parser, argv, entry: str) -> argparse.Namespace:
    """A script's arguments with `--config FILE` (its `args.config`) expanded; `entry` is the script as an
    experiment file's `command` names it ('benchmarks/toyworld_safety.py'). A refused file exits with one
    line, "PROG: error: FILE: KEY: ...", and status 2."""
    if not any(FLAG in a.option_strings for a in parser._actions):
        add_option(parser)
    try:
        argv = expand(parser, sys.argv[1:] if argv is None else argv, entry)
    except ExperimentError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return parser.parse_args(argv)
