"""MkDocs hooks: the home page is the README (one source), and the command-line reference page is generated from
the option dataclasses at build time, so neither can drift from what it describes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

MARKER = "<!-- cli-reference -->"
README_MARKER = "<!-- readme -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _command_markdown(name: str) -> str:
    from anomalens.cli.parser import COMMANDS, command_parser

    parser = command_parser(name)
    lines = [f"## `anomalens {name}`", "", COMMANDS[name].help, "", "```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| option | meaning |", "|---|---|"]
        for action in actions:
            names = ", ".join(f"`{option}`" for option in action.option_strings) or f"`{action.dest}`"
            lines.append(f"| {names} | {_escape(action.help or '').replace('%%', '%')} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if README_MARKER in markdown:  # the README's links point into docs/; the site's home is docs/ itself
        return re.sub(r"\]\(docs/", "](", README.read_text())
    if MARKER not in markdown:
        return markdown
    from anomalens.cli.parser import COMMANDS

    return markdown.replace(MARKER, "\n".join(_command_markdown(name) for name in COMMANDS))
