"""Every `safe-rlhf-v ...` and `make ...` command the README shows exists and takes the flags shown.

Commands come from the README's code blocks, its tables and its inline code. Concrete commands (no
`DIR`-style placeholders or `[optional]` brackets) are parsed with the real parser, values
included; the command table's synopses are checked flag by flag; the commands that talk to a
cluster answer `--help`. Make targets must exist in the Makefile.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from safe_rlhf_v.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLUSTER_COMMANDS = {"upload", "submit", "schedule", "runs"}
# The program where a shell command starts (after `&&` or `$(`, with a path such as `.venv/bin/`),
# or as `torchrun ... -m safe_rlhf_v.cli`; then its arguments up to a comment or a pipe. The first
# argument must be a word or a flag, which leaves out printed tables that name the variant.
_PROGRAM = re.compile(
    r"(?:(?:^|&&|\$\()\s*(?:\S*/)?safe-rlhf-v|-m safe_rlhf_v\.cli)\s+(?P<args>[a-z-][^|#`\n]*)",
    flags=re.MULTILINE,
)


def code_blocks(text: str) -> list[str]:
    """The README's fenced code blocks, with shell line continuations joined."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [block.replace("\\\n", " ") for block in blocks]


def inline_code(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks (tables and prose), `\\|` read as `|`."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", prose)]


def runnable_commands() -> list[str]:
    """The argument lists after `safe-rlhf-v` (or `-m safe_rlhf_v.cli`) in the code blocks: what a
    reader copies and runs as shown."""
    return [match["args"].strip() for block in code_blocks(README) for match in _PROGRAM.finditer(block)]


def shown_commands() -> list[str]:
    """Every command the README shows: the code blocks', inline code's (which may name a command
    without its required flags) and the command table's synopses (without the program's name)."""
    found = runnable_commands()
    spans = inline_code(README)
    found += [match["args"].strip() for span in spans for match in _PROGRAM.finditer(span)]
    found += [span for span in spans if " " in span and span.split(" ", 1)[0] in subcommands()]
    return sorted(set(found))


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_-]+):", makefile, flags=re.MULTILINE))


def is_concrete(tokens: list[str]) -> bool:
    """No placeholder (`DIR`, `N`, `FILE.yaml`, `<time>`), optional part or alternative: a command
    to parse as given, values included."""
    return not any(re.search(r"\b[A-Z][A-Z_.]*[A-Z]\b|\bN\b|[\[\]<>|]|\.\.\.", token) for token in tokens)


COMMANDS = shown_commands()
RUNNABLE = set(runnable_commands())


def test_the_readme_shows_commands_to_check() -> None:
    shown = {command.split()[0] for command in COMMANDS}
    assert {"run", "evaluate", "promote", "serve", "compile", "schedule"} <= shown


@pytest.mark.parametrize("command", COMMANDS)
def test_each_shown_command_exists_and_takes_its_flags(command: str) -> None:
    tokens = shlex.split(command)
    while tokens and tokens[0].startswith("-"):  # global options before the subcommand
        assert tokens[0] in build_parser()._option_string_actions, f"{command}: {tokens[0]}"
        tokens = tokens[1:]
    if not tokens:
        return
    parsers = subcommands()
    assert tokens[0] in parsers, f"`safe-rlhf-v {command}`: no subcommand {tokens[0]!r}"
    accepted = parsers[tokens[0]]._option_string_actions
    for flag in (token.strip("[]").split("=")[0] for token in tokens[1:]):
        if flag.startswith("-"):
            assert flag in accepted, f"`safe-rlhf-v {command}`: {tokens[0]} does not take {flag}"
    if command in RUNNABLE and is_concrete(tokens):
        build_parser().parse_args(tokens)  # exits 2 on a value the parser refuses


@pytest.mark.parametrize("command", sorted(CLUSTER_COMMANDS))
def test_cluster_commands_answer_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--host" in capsys.readouterr().out


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from safe_rlhf_v import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"safe-rlhf-v {__version__}"


def test_every_make_command_names_a_target() -> None:
    targets = make_targets()
    shown = []
    for text in [*code_blocks(README), *inline_code(README)]:
        shown += re.findall(r"(?:^|\s|`)make((?:\s+[A-Za-z0-9_=-]+)+)", text, flags=re.MULTILINE)
    names = {word for words in shown for word in words.split() if "=" not in word}
    assert {"demo", "test", "compile"} <= names
    assert names <= targets, f"README names make targets the Makefile lacks: {sorted(names - targets)}"


def test_the_readme_names_the_commands_that_take_no_config() -> None:
    sentence = re.search(r"Every command\s+except (?P<names>.*?) reads a config", README, flags=re.DOTALL)
    assert sentence, "the README says which commands take --config"
    named = set(re.findall(r"`([a-z-]+)`", sentence["names"]))
    without = {
        name for name, parser in subcommands().items() if "--config" not in parser._option_string_actions
    }
    assert named == without
