"""The help is generated from the parsers, and a typo gets the nearest valid name."""

import argparse

import pytest

from mino_jupyter.commands import cell_parser, commands_help, line_parser, magic_help
from mino_jupyter.errors import UsageError


def _commands() -> list[str]:
    sub = next(a for a in line_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_lists_every_command_and_every_option_the_parsers_accept():
    text = magic_help()
    listed = [line.split()[0] for line in commands_help().splitlines()[1:] if line.startswith("  ") and line[2] != " "]
    assert listed == _commands()  # every command, in order, nothing invented
    for name in ("config", "trust", "panel", "help"):  # the ones the hand-written help had left out
        assert f"\n  {name}" in text
    for option in cell_parser()._option_string_actions:
        assert option in text
    assert "%%mino --help" not in text  # it no longer points back and forth
    assert "%%mino options" not in commands_help() and "%mino options" in commands_help()


def test_percent_percent_mino_question_mark_shows_the_generated_help():
    from mino_jupyter.magics import MinoMagics

    assert MinoMagics.mino.__doc__ == magic_help()


@pytest.mark.parametrize("parser,argv,suggestion", [
    (cell_parser, ["--netwrok", "none"], "(did you mean --network?)"),
    (cell_parser, ["--sesion=x"], "(did you mean --session?)"),
    (line_parser, ["sesions"], "(did you mean 'sessions'?)"),
    (line_parser, ["confg"], "(did you mean 'config'?)"),
])
def test_a_typo_gets_the_nearest_valid_name(parser, argv, suggestion):
    with pytest.raises(UsageError) as e:
        parser().parse_args(argv)
    assert e.value.message.endswith(suggestion) and e.value.hint


def test_nothing_close_gets_no_guess():
    with pytest.raises(UsageError) as e:
        cell_parser().parse_args(["--zzzzzz"])
    assert "did you mean" not in e.value.message
