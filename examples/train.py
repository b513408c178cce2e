"""Train a DreamBooth subject: `accelerate launch examples/train.py --pretrained_model_name_or_path ... [flags]`.

Takes the flags of diffusers' `examples/dreambooth/train_dreambooth*.py` (LoRA with `--adapter lora`), or
`--config run.yaml`. See `python examples/train.py --help`.
"""

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.cli import parse_config


def main() -> None:
    config = parse_config()
    DreamBoothTrainer(config).train()


if __name__ == "__main__":
    main()
