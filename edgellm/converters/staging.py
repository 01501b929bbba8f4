"""Write an output folder so that it appears complete or not at all.

A converter writes into ``.<name>.partial-<pid>`` beside the final path; only when the
folder is complete and verified is it renamed into place (an atomic rename on one file
system). A conversion killed midway leaves at most a partial folder, never a file at the
final name; stale partial folders of dead processes are removed by the next conversion.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from edgellm.artifact import Artifact, find_artifact, write_manifest
from edgellm.errors import ConversionError, InvalidInputError, OutputExistsError

logger = logging.getLogger(__name__)

__all__ = ["Staging"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: OSError numbers that mean "the output does not fit", and how to say so.
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file would pass the file-size limit",
}
# numpy's tofile() reports a short write as a bare OSError with no errno
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def no_room_error(output: Path, staging: Path, exc: BaseException) -> ConversionError | None:
    """The one-line error for a write that ran out of room (anywhere in ``exc``'s chain), or None.

    It names the output, how many bytes were written, the bytes a short write missed when the
    writer says so, and the space left, instead of "940032 requested and 664640 written".
    """
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    short = _SHORT_WRITE.search(str(seen))
    if seen.errno not in _NO_ROOM and short is None:
        return None
    cause = _NO_ROOM.get(seen.errno or 0, "a write came up short (disk full or a file-size limit)")
    missing = ""
    if short:
        missing = f"; a write of {short[1]} bytes stopped {int(short[1]) - int(short[2])} bytes short"
    written = _folder_bytes(staging) if staging.exists() else 0
    free = shutil.disk_usage(output.parent).free
    return ConversionError(
        f"{output}: {cause} after writing {written} bytes{missing} ({free} bytes free on that disk); "
        "free some space or choose another output folder and convert again; nothing was left at the output"
    )


def _remove_stale_partials(parent: Path, name: str) -> None:
    for stale in parent.glob(f".{name}.partial-*"):
        pid_text = stale.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            logger.info("removing stale partial output %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


class Staging:
    """Context manager: a temp folder that becomes ``output`` on :meth:`commit`.

    Leaving the block without commit (an exception, a failed check) removes the temp
    folder and leaves ``output`` as it was.
    """

    def __init__(self, output: Path, force: bool = False) -> None:
        self.output = output.expanduser().absolute()
        if self.output.exists() and not force:
            raise OutputExistsError(
                f"output {str(output)!r} already exists; choose another path or pass --force to replace it"
            )
        if self.output.exists() and not self.output.is_dir():
            raise InvalidInputError(f"output {str(output)!r} is a file; the output must be a folder path")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.output.parent, self.output.name)
        self.path = self.output.parent / f".{self.output.name}.partial-{os.getpid()}"
        self._committed = False

    def __enter__(self) -> Staging:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def commit(self) -> Path:
        """Move the finished folder into place (replacing an old one only now)."""
        if self.output.exists():
            old = self.output.parent / f".{self.output.name}.old-{os.getpid()}"
            os.replace(self.output, old)
            os.replace(self.path, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.output)
        self._committed = True
        return self.output

    def commit_artifact(self, manifest: dict[str, Any], started: float) -> Artifact:
        """Finish ``manifest`` (folder size unless given, conversion time), write it, commit.

        Every converter ends this way: the manifest is written last, inside the staging
        folder, so a folder at the final name always has one.
        """
        manifest.setdefault("size_bytes", sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()))
        manifest["convert_seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(self.path, manifest)
        return find_artifact(self.commit())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            no_room = no_room_error(self.output, self.path, exc) if exc is not None else None
            shutil.rmtree(self.path, ignore_errors=True)
            if no_room is not None:
                raise no_room from exc
