"""The DreamBooth web app as a Hugging Face Space (Gradio SDK): the same app as `python -m diffusers_dreambooth.app`.

The Space's runs live in its persistent storage (`/data`) when it has some, else in a folder beside this file.
"""

import os
from pathlib import Path

from diffusers_dreambooth.app.runs import MAX_UPLOAD_BYTES
from diffusers_dreambooth.app.ui import build_app

WORK_DIR = Path("/data/dreambooth-runs" if Path("/data").is_dir() else Path(__file__).parent / "dreambooth-runs")

if __name__ == "__main__":
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    auth = tuple(os.environ["APP_AUTH"].split(":", 1)) if os.environ.get("APP_AUTH") else None
    build_app(WORK_DIR).launch(
        server_name="0.0.0.0", auth=auth, max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[str(WORK_DIR)]
    )
