"""Keep what native libraries write straight to file descriptor 2 off the user's terminal.

OpenVINO's frontends (a garbage ``.xml`` is offered to the TensorFlow frontend, whose absl
logger prints five lines) and native loaders write to the process's stderr below Python.
During a native load, :func:`captured_stderr` points descriptor 2 at a temporary file and
hands the lines to :mod:`logging` at DEBUG afterwards; the failure itself reaches the user as
one edgellm error. ``edgellm -vv`` shows the captured lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["captured_stderr"]

_LOCK = threading.RLock()  # descriptor 2 is process-wide: one capture at a time


@contextlib.contextmanager
def captured_stderr(logger: logging.Logger, what: str) -> Iterator[list[str]]:
    """Within the block, descriptor 2 goes to a file; afterwards its lines fill the yielded list."""
    lines: list[str] = []
    with _LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
            lines.extend(ln for ln in text.splitlines() if ln.strip())
            for line in lines:
                logger.debug("%s (native stderr): %s", what, line)
