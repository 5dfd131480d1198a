"""Starting a server program as a real process and waiting until it says it serves."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serving_process(command: list[str], ready_prefix: str, timeout: float) -> Iterator[str]:
    """Run `command`; yield the first stderr line starting with `ready_prefix`; stop it after.

    Fails with the program's whole stderr if it exits before saying it is ready.
    """
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = threading.Event()
    lines: list[str] = []

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if line.startswith(ready_prefix):
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        ready.wait(timeout=timeout)
        assert process.poll() is None, "".join(lines)
        yield next(line for line in lines if line.startswith(ready_prefix)).strip()
    finally:
        process.terminate()
        process.wait(timeout=30)
