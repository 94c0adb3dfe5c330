"""The command-line reference (docs/cli.md), generated from the `jaxdit` argparse parser itself.

    python -m jaxdit.cli_reference --out docs/cli.md     # rewrite the committed page
    python -m jaxdit.cli_reference                       # print it

Every command and sub-command of `jaxdit.cli.build_parser()` gets a section with its help line, its
description, a synopsis and a table of its arguments (flags, metavars, choices, defaults, help).
The synopsis is built here rather than taken from argparse's usage line, so the page does not depend on
the terminal width or on the Python version's usage formatting. `tests/test_cli_reference.py` fails
when the committed page differs from what this module generates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMAND = "python -m jaxdit.cli_reference --out docs/cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases point at the same parser
                    continue
                seen.add(id(sub))
                out.append((name, helps.get(name, ""), sub))
    return out


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS]


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _value_syntax(action: argparse.Action) -> str:
    """How the value(s) of an argument are written: 'X', '[X]', 'X [X ...]', '[X ...]', 'X X'."""
    if not _takes_value(action):
        return ""
    m = _metavar(action)
    nargs = action.nargs
    if nargs is None:
        return m
    if nargs == "?":
        return f"[{m}]"
    if nargs == "+":
        return f"{m} [{m} ...]"
    if nargs == "*":
        return f"[{m} ...]"
    if isinstance(nargs, int):
        return " ".join([m] * nargs)
    return m


def _spelling(action: argparse.Action) -> str:
    """The argument as written on the command line: '--dtype {float32,bfloat16}', 'SRC', '--overwrite'."""
    value = _value_syntax(action)
    if not action.option_strings:
        return value
    flags = ", ".join(action.option_strings)
    return f"{flags} {value}" if value else flags


def _required(action: argparse.Action) -> bool:
    return bool(action.required) if action.option_strings else action.nargs not in ("?", "*")


def _groups(parser: argparse.ArgumentParser) -> dict[int, argparse._MutuallyExclusiveGroup]:
    return {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    parts, done = [prog], set()
    groups = _groups(parser)
    actions = _arguments(parser)
    options = [a for a in actions if a.option_strings]
    positionals = [a for a in actions if not a.option_strings]
    for a in options:
        if id(a) in done:
            continue
        group = groups.get(id(a))
        if group is not None:
            members = [m for m in group._group_actions if m.help != argparse.SUPPRESS]
            done.update(id(m) for m in members)
            text = " | ".join(f"{m.option_strings[0]} {_value_syntax(m)}".strip() for m in members)
            parts.append(f"({text})" if group.required else f"[{text}]")
            continue
        text = f"{a.option_strings[0]} {_value_syntax(a)}".strip()
        parts.append(text if a.required else f"[{text}]")
    parts += [_value_syntax(a) for a in positionals]
    if _subcommands(parser):
        parts.append("COMMAND ...")
    return " ".join(parts)


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or not _takes_value(action) or (action.required and action.option_strings):
        return ""
    if isinstance(d, (list, tuple)):
        return "`" + " ".join(str(v) for v in d) + "`" if action.nargs in ("+", "*") or isinstance(action.nargs, int) \
            else f"`{','.join(str(v) for v in d)}`"
    return f"`{d}`"


def _expand_help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return text % params


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def _section(prog: str, help_line: str, parser: argparse.ArgumentParser, level: int, out: list[str]) -> None:
    out.append(f"{'#' * min(level, 6)} {prog}")
    out.append("")
    if help_line:
        out.append(help_line[0].upper() + help_line[1:] + ("" if help_line.endswith(".") else "."))
        out.append("")
    if parser.description and parser.description != help_line:
        out.append(" ".join(parser.description.split()))
        out.append("")
    out += ["```", _synopsis(prog, parser), "```", ""]
    actions = _arguments(parser)
    if actions:
        groups = _groups(parser)
        out += ["| argument | required | default | description |", "| --- | --- | --- | --- |"]
        for a in actions:
            required = "yes" if _required(a) else ""
            group = groups.get(id(a))
            if group is not None:
                members = [m.option_strings[0] for m in group._group_actions if m.help != argparse.SUPPRESS]
                required = ("one of " if group.required else "at most one of ") + ", ".join(members)
            out.append(f"| `{_cell(_spelling(a))}` | {_cell(required)} | {_default(a)} | "
                       f"{_cell(_expand_help(a, prog))} |")
        out.append("")
    subs = _subcommands(parser)
    if subs:
        out += ["| command | what it does |", "| --- | --- |"]
        for name, help_line_sub, _ in subs:
            out.append(f"| [`{prog} {name}`](#{_anchor(f'{prog} {name}')}) | {_cell(help_line_sub)} |")
        out.append("")
        for name, help_line_sub, sub in subs:
            _section(f"{prog} {name}", help_line_sub, sub, level + 1, out)


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference of `parser` (default: `jaxdit.cli.build_parser()`)."""
    if parser is None:
        from jaxdit.cli import build_parser

        parser = build_parser()
    out = ["# jaxdit command-line reference", "",
           f"Generated from the argparse parser (`jaxdit.cli.build_parser`) by `{COMMAND}`; do not edit it by "
           "hand. `jaxdit COMMAND --help` prints the same information.", ""]
    _section(parser.prog, "", parser, 2, out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdit.cli_reference",
                                description="Write the Markdown command-line reference of `jaxdit`.")
    p.add_argument("--out", help="file to write (default: print to stdout)")
    args = p.parse_args(argv)
    text = render()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
