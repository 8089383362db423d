"""The command line's building blocks, shared by ``ptqlab run`` (``cli.py``) and the study commands
(``study/cli.py``): argparse types that check values as the config does, and the project's usage errors.
Kept apart so neither command module imports the other."""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable

from .config import OPTIONS, help_with_default, parse_text_value


class Parser(argparse.ArgumentParser):
    """argparse with the project's form of a usage error: one line starting with ``error:``, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class DeprecatedFlag(argparse.Action):
    """An old spelling of a boolean flag: sets the value and warns once."""

    def __init__(self, option_strings, dest, const=None, new_flag="", **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release: use {self.new_flag}",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const)


def _cli_value(option):
    """argparse ``type=``: a command-line string checked as the option checks recipe values."""

    def convert(text: str):
        value = parse_text_value(option.key, text)
        try:
            return option.validate(value, cli=True)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    convert.__name__ = option.key  # argparse names it in "invalid ... value"
    return convert


def checked_int(check: Callable[[int], None], name: str) -> Callable[[str], int]:
    """argparse ``type=``: an integer that ``check`` (raising ValueError) accepts, checked while parsing."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    convert.__name__ = name
    return convert


def at_least(lo: int, flag: str) -> Callable[[str], int]:
    def check(value: int) -> None:
        if value < lo:
            raise ValueError(f"{flag} must be at least {lo}, got {value}")

    return checked_int(check, flag)


def device_arg(text: str) -> str:
    """argparse ``type=`` of ``--device``: cpu, cuda or cuda:N (whether CUDA is there is checked later)."""
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give cpu, cuda or cuda:N")


def add_option(p, key: str, default: object = ..., help: str | None = None) -> None:  # noqa: A002
    """``--key`` of a config option (:data:`ptqlab.config.OPTIONS`) on another command than ``run``:
    the option's own check and help, with this command's default."""
    option = OPTIONS[key]
    default = option.default if default is ... else default
    text = help or option.help
    p.add_argument(option.flag, dest=key, type=_cli_value(option), default=default,
                   help=help_with_default(text, option.unset if default is None else default))
