"""Train a DreamBooth subject: `accelerate launch examples/train.py --pretrained_model_name_or_path ... [flags]`.

Takes the flags of diffusers' `examples/dreambooth/train_dreambooth*.py` (LoRA with `--adapter lora`), or
`--config run.yaml`. See `python examples/train.py --help`. With no base model or subject named it trains the bundled
example subject (a striped star, `sks star`) on the bundled toy base model, in a few minutes on a CPU: into
`toy-sks-star/` (full fine-tune), or with `--adapter lora` the toy LoRA recipe into `toy-sks-star-lora/`; other flags
go on top.
"""

import logging
import sys

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.cli import exit_with_input_error, names_a_subject, parse_config, parse_toy_config
from diffusers_dreambooth.finishing import FinishingError
from diffusers_dreambooth.safeguards import (
    DiskSpaceError,
    DreamBoothInputError,
    NonFiniteLossError,
    TrainingInterrupted,
)

logger = logging.getLogger("train")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if names_a_subject(args):
        config = parse_config(args)
    else:  # e.g. no flags at all, or `--adapter lora`
        logger.info("No base model or subject given: training the bundled subject on the toy model (see --help).")
        config = parse_toy_config(args)
    try:
        DreamBoothTrainer(config).train()
    except DreamBoothInputError as error:  # the user's mistake: one `error:` line, exit 2 as for a bad flag
        exit_with_input_error(error)
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM: the checkpoint is saved; exit as the signal would
        logger.warning("%s", stop)
        sys.exit(stop.exit_code)
    except (DiskSpaceError, NonFiniteLossError) as error:  # the run stopped before harm: earlier checkpoints are whole
        logger.error("%s", error)
        sys.exit(1)
    except FinishingError as error:  # the trained subject is saved; a stage after it (samples, card, push) failed
        logger.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
