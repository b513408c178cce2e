"""Train a DreamBooth subject: `accelerate launch examples/train.py --pretrained_model_name_or_path ... [flags]`.

Takes the flags of diffusers' `examples/dreambooth/train_dreambooth*.py` (LoRA with `--adapter lora`), or
`--config run.yaml`. See `python examples/train.py --help`. With no arguments at all it trains the bundled example
subject (a striped star, `sks star`) on the bundled toy base model into `toy-sks-star/`, in a few minutes on a CPU.
"""

import logging
import sys

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.cli import exit_with_input_error, parse_config
from diffusers_dreambooth.finishing import FinishingError
from diffusers_dreambooth.input_checks import check_before_loading
from diffusers_dreambooth.safeguards import (
    DiskSpaceError,
    DreamBoothInputError,
    NonFiniteLossError,
    TrainingInterrupted,
)
from diffusers_dreambooth.toy import toy_dreambooth_config


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) == 1:
        logging.info("No options: training the bundled subject on the bundled toy model (see --help for options).")
        config = toy_dreambooth_config()
    else:
        config = parse_config()
    try:
        check_before_loading(config)  # paths and --resolution, before the model loads
        DreamBoothTrainer(config).train()
    except DreamBoothInputError as error:  # the user's mistake: one `error:` line, exit 2 as for a bad flag
        exit_with_input_error(error)
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM: the checkpoint is saved; exit as the signal would
        logging.warning("%s", stop)
        sys.exit(stop.exit_code)
    except (DiskSpaceError, NonFiniteLossError) as error:  # the run stopped before harm: earlier checkpoints are whole
        logging.error("%s", error)
        sys.exit(1)
    except FinishingError as error:  # the trained subject is saved; a stage after it (samples, card, push) failed
        logging.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
