"""Command line: diffusers' DreamBooth flags, or a YAML/JSON file, parsed into a `DreamBoothConfig`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

from .config import DreamBoothConfig, read_options_file


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        DreamBoothConfig,
        description="DreamBooth training for diffusers pipelines; flags as in diffusers' train_dreambooth*.py.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", default=None, help="YAML or JSON file of options; flags given on the command line override it."
    )
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (`.yaml`/`.yml`) or JSON file, as a dict of field names to values."""
    values = read_options_file(path, "options")
    if not isinstance(values, dict):
        raise ValueError(f"Config file `{path}` must hold a mapping of option names to values.")
    return values


def parse_config(args: list[str] | None = None) -> DreamBoothConfig:
    """Parse command-line flags (and an optional `--config` file) into a validated `DreamBoothConfig`.

    Unknown flags, unknown keys in the file and invalid combinations exit with a message naming them. Flags must be
    spelt out: argparse's prefix matching is off, so a misspelt flag fails instead of setting another option.
    """
    args = sys.argv[1:] if args is None else list(args)
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config", default=None)
    known, _ = pre_parser.parse_known_args(args)
    try:
        if known.config is not None:
            file_values = read_config_file(known.config)
            unknown = sorted(set(file_values) - set(DreamBoothConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"Unknown option(s) in `{known.config}`: {', '.join(unknown)}.")
            parser.set_defaults(**file_values)
        namespace, remaining = parser.parse_known_args(args)
        if remaining:
            raise ValueError(f"Unrecognized argument(s): {' '.join(remaining)}. See `--help` for the options.")
        values = {k: v for k, v in vars(namespace).items() if k != "config"}
        return DreamBoothConfig(**values)
    except (ValueError, FileNotFoundError) as error:
        exit_with_input_error(error, parser.prog)


def exit_with_input_error(error: BaseException, prog: str | None = None) -> NoReturn:
    """Exit as argparse does on a bad flag: one line `<prog>: error: <message>` on stderr, exit status 2.

    For mistakes in the run's options or inputs (`DreamBoothInputError`), which need no traceback.
    """
    prog = prog or Path(sys.argv[0]).name
    message = " ".join(str(error).split("\n"))
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)
