"""Train a DreamBooth subject: `accelerate launch examples/train.py --pretrained_model_name_or_path ... [flags]`.

Takes the flags of diffusers' `examples/dreambooth/train_dreambooth*.py` (LoRA with `--adapter lora`), or
`--config run.yaml`. See `python examples/train.py --help`. With no base model or subject named it trains the bundled
example subject (a striped star, `sks star`) on the bundled toy base model, in a few minutes on a CPU: into
`toy-sks-star/` (full fine-tune), or with `--adapter lora` the toy LoRA recipe into `toy-sks-star-lora/`; other flags
go on top. The entry point is `diffusers_dreambooth.cli.main`, which the web app's runs use too.
"""

from diffusers_dreambooth.cli import main

if __name__ == "__main__":
    main()
