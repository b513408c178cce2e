"""Command line: diffusers' DreamBooth flags, or a YAML/JSON file, parsed into a `DreamBoothConfig`, and `main`,
the training entry point of `accelerate launch examples/train.py` and of the web app's runs
(`accelerate launch -m diffusers_dreambooth.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from transformers import HfArgumentParser

from .config import DreamBoothConfig, read_options_file
from .toy import toy_dreambooth_config

#: Flags that name a base model, a subject or an options file (see `names_a_subject`).
SUBJECT_OPTIONS = (
    "--pretrained_model_name_or_path",
    "--config",
    "--instance_data_dir",
    "--concepts_list",
    "--dataset_name",
)


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


def parse_config(args: list[str] | None = None, defaults: dict[str, Any] | None = None) -> DreamBoothConfig:
    """Parse command-line flags (and an optional `--config` file) into a validated `DreamBoothConfig`.

    Unknown flags, unknown keys in the file and invalid combinations exit with a message naming them. Flags must be
    spelt out: argparse's prefix matching is off, so a misspelt flag fails instead of setting another option.
    `defaults` replace the options' own defaults (a `--config` file and the flags override them).
    """
    args = sys.argv[1:] if args is None else list(args)
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config", default=None)
    known, _ = pre_parser.parse_known_args(args)
    if defaults:
        parser.set_defaults(**defaults)
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


def names_a_subject(args: list[str]) -> bool:
    """Whether the flags name a base model, a subject or an options file; without any, `examples/train.py` trains the
    bundled subject on the bundled toy model (`parse_toy_config`)."""
    return any(arg.split("=")[0] in SUBJECT_OPTIONS for arg in args)


def parse_toy_config(args: list[str]) -> DreamBoothConfig:
    """The bundled subject on the toy model, `toy_dreambooth_config` for the flags' `--adapter` (`lora`: the toy LoRA
    recipe) and `--output_dir`, with every other flag given on top of it."""
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--adapter", default="full", choices=("full", "lora"))
    pre_parser.add_argument("--output_dir", default=None)
    known, _ = pre_parser.parse_known_args(args)
    return parse_config(args, defaults=toy_dreambooth_config(known.output_dir, adapter=known.adapter).to_dict())


def exit_with_input_error(error: BaseException, prog: str | None = None) -> NoReturn:
    """Exit as argparse does on a bad flag: one line `<prog>: error: <message>` on stderr, exit status 2.

    For mistakes in the run's options or inputs (`DreamBoothInputError`), which need no traceback.
    """
    prog = prog or Path(sys.argv[0]).name
    message = " ".join(str(error).split("\n"))
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Parse the flags, train, and exit as the outcome says: 2 for the user's mistake (one `error:` line), the
    signal's status after Ctrl-C or SIGTERM (the checkpoint saved), 1 when the run stopped before harm or a stage
    after saving failed."""
    from .finishing import FinishingError
    from .safeguards import DiskSpaceError, DreamBoothInputError, NonFiniteLossError, TrainingInterrupted
    from .trainer import DreamBoothTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("train")
    args = sys.argv[1:] if args is None else list(args)
    if names_a_subject(args):
        config = parse_config(args)
    else:  # e.g. no flags at all, or `--adapter lora`
        config = parse_toy_config(args)  # `--help` prints the options and exits here, before the message below
        logger.info("No base model or subject given: training the bundled subject on the toy model (see --help).")
    try:
        DreamBoothTrainer(config).train()
    except DreamBoothInputError as error:  # the user's mistake: one `error:` line, exit 2 as for a bad flag
        exit_with_input_error(error)
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM: the checkpoint is saved; exit as the signal would
        logger.warning("%s", stop)
        sys.exit(stop.exit_code)
    except (DiskSpaceError, NonFiniteLossError, FinishingError) as error:  # stopped before harm, or after saving
        logger.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
