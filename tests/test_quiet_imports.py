"""A run's console (#18): importing the package, and with it diffusers, transformers and peft, prints none of the
warnings optional packages log on import about backends the run does not use; anything else they log still shows."""

import logging
import os
import subprocess
import sys

from diffusers_dreambooth.quiet_imports import IMPORT_NOISE, DropImportNoise

IMPORTS = "from diffusers import DiffusionPipeline, StableDiffusionPipeline, SanaPipeline; import peft, transformers"


def import_stderr(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_importing_the_package_prints_no_import_noise():
    noisy = import_stderr(IMPORTS)  # the same imports without the package: what a user saw
    heard = [fragment for fragment in IMPORT_NOISE.values() if fragment in noisy]
    assert heard, noisy  # bitsandbytes and torchao (test extras) are installed, torchvision is not
    quiet = import_stderr(f"import diffusers_dreambooth; {IMPORTS}")
    assert [fragment for fragment in IMPORT_NOISE.values() if fragment in quiet] == [], quiet
    assert "Failed to load" not in quiet and "torchvision" not in quiet


def test_the_filters_drop_only_the_import_warnings(caplog):
    fragment = IMPORT_NOISE["torchao"]
    logger = logging.getLogger("torchao")
    assert any(isinstance(existing, DropImportNoise) for existing in logger.filters)
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /site-packages/torchao/_C.so: %s", fragment)
        logger.warning("Float8 layers skipped: sizes must be multiples of 16")
    assert [record.getMessage() for record in caplog.records] == [
        "Float8 layers skipped: sizes must be multiples of 16"
    ]
