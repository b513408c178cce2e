"""`python -m diffusers_dreambooth.app [--host 127.0.0.1] [--port 7860] [--work_dir dreambooth-runs] [--auth user:pw]`.

Binding beyond localhost needs `--auth`: the page trains models and writes files on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffusers_dreambooth.app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind; beyond localhost needs --auth.")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    parser.add_argument(
        "--work_dir", default="dreambooth-runs", help="Folder of the runs; the app reads and writes only there."
    )
    parser.add_argument("--auth", default=None, help="`user:password` asked by the page.")
    parser.add_argument(
        "--share", action="store_true", help="Also serve through a public gradio.live link (needs --auth)."
    )
    options = parser.parse_args(args)
    if options.auth is not None and ":" not in options.auth:
        parser.error("`--auth` is `user:password`.")
    if (options.host not in LOCAL_HOSTS or options.share) and options.auth is None:
        parser.error(
            f"`--host {options.host}`{' --share' if options.share else ''} serves beyond this machine:"
            " pass `--auth user:password`."
        )
    return options


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app works offline; it reports nothing
    try:
        from .ui import build_app
    except ModuleNotFoundError as error:
        if error.name not in ("gradio", "pandas"):
            raise
        sys.exit(f'The app needs its extra: pip install -e ".[app]" ({error}).')
    from .runs import MAX_UPLOAD_BYTES

    work_dir = Path(options.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    auth = tuple(options.auth.split(":", 1)) if options.auth else None
    build_app(work_dir).launch(
        server_name=options.host,
        server_port=options.port,
        auth=auth,
        share=options.share,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[str(work_dir)],
        footer_links=["gradio"],
    )


if __name__ == "__main__":
    main()
