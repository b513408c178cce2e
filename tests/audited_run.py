"""Run a Python script while an audit hook records what this process writes under a folder and whom it connects to.

`python audited_run.py SCRIPT [ARGS...]` with `AUDIT_FOLDER` (the folder to watch) and `AUDIT_LOG` (a log path,
suffixed with the process's `RANK`) in the environment. Each line of the log is an event: `write <path>`,
`mkdir <path>`, `rename <src> -> <dst>`, `remove <path>`, `connect <host>:<port>`. Python's audit events see every
file opened or created from Python, every rename and removal, and every socket connection; a write from native code
(safetensors, torch.save) into a file that Python did not create or rename is not seen, but the trainer creates each
checkpoint and output folder from Python before anything is written into it.
"""

import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
FOLDER_EVENTS = {
    "os.mkdir": "mkdir",
    "os.remove": "remove",
    "os.rmdir": "remove",
    "shutil.rmtree": "remove",
    "os.truncate": "write",
    "os.symlink": "link",
    "os.link": "link",
}


def _path(value) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.path.realpath(os.fsdecode(value))
    return None


def install(folder: str, log_path: str) -> None:
    """Log this process's writes under `folder` and its socket connections to `log_path`."""
    folder = os.path.realpath(folder)
    log = open(log_path, "w", buffering=1)  # opened before the hook, so writing to it is not an event itself

    def watched(value) -> bool:
        path = _path(value)
        return path is not None and (path == folder or path.startswith(folder + os.sep))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args  # flags are os.open's for both open() and os.open()
            if flags & WRITE_FLAGS and watched(path):
                log.write(f"write {_path(path)}\n")
        elif event in FOLDER_EVENTS and watched(args[0]):
            log.write(f"{FOLDER_EVENTS[event]} {_path(args[0])}\n")
        elif event in ("os.rename", "os.replace", "shutil.copyfile", "shutil.move") and (
            watched(args[0]) or watched(args[1])
        ):
            log.write(f"rename {_path(args[0])} -> {_path(args[1])}\n")
        elif event == "socket.connect" and isinstance(args[1], tuple):
            log.write(f"connect {args[1][0]}:{args[1][1]}\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    install(os.environ["AUDIT_FOLDER"], f"{os.environ['AUDIT_LOG']}.rank{os.environ.get('RANK', '0')}")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
