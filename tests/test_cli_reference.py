"""docs/cli.md is generated from the `jaxdit` parser and must match it exactly."""

import argparse
from pathlib import Path

from jaxdit import cli_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_committed_reference_is_current():
    expected = cli_reference.render()
    committed = DOC.read_text() if DOC.exists() else ""
    assert committed == expected, (
        f"{DOC} is out of date with the jaxdit command line; regenerate it with "
        f"`{cli_reference.COMMAND}` and commit the result")


def test_every_command_is_documented():
    """Each sub-command at every depth has its own section, with every option of its parser."""
    from jaxdit.cli import build_parser

    text = cli_reference.render()

    def walk(prog, parser):
        assert f"# {prog}\n" in text, f"no section for `{prog}`"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{prog} {name}", sub)
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                assert f"`{action.option_strings[0]}" in text, f"`{prog}` option {action.option_strings[0]} missing"

    walk("jaxdit", build_parser())


def test_rendering_of_a_small_parser():
    p = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run it", description="Runs | pipes.")
    run.add_argument("src")
    run.add_argument("--mode", choices=["a", "b"], default="a", help="mode (default %(default)s)")
    run.add_argument("--mesh", default=(-1, 1, 1), help="sizes")
    run.add_argument("--ids", nargs="+", type=int, required=True)
    group = run.add_mutually_exclusive_group(required=True)
    group.add_argument("--x", action="store_true")
    group.add_argument("--y", metavar="Y")
    nested = sub.add_parser("group", help="a group").add_subparsers(dest="inner", required=True)
    nested.add_parser("leaf", help="the leaf")
    text = cli_reference.render(p)

    assert "### tool run\n\nRun it.\n\nRuns | pipes.\n" in text
    assert "tool run [--mode {a,b}] [--mesh MESH] --ids IDS [IDS ...] (--x | --y Y) src" in text
    assert "| `--mode {a,b}` |  | `a` | mode (default a) |" in text
    assert "| `--mesh MESH` |  | `-1,1,1` | sizes |" in text
    assert "| `--y Y` | one of --x, --y |  |  |" in text
    assert "| [`tool run`](#tool-run) | run it |" in text
    assert "#### tool group leaf\n\nThe leaf.\n" in text
