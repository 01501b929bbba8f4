"""The fuzzer's worker: reads one JSON case per line on stdin, opens the file, answers one line.

A case is ``{"kind": "gguf" | "safetensors", "path": ...}``. GGUF: inspect, load, one greedy
token (:func:`edgellm.isolate.open_once`). safetensors (a checkpoint folder): inspect, convert to
a F32 GGUF without verification, then the GGUF path on the result. The answer's ``status`` is
ok, edgellm (an EdgeLLMError, its class and message) or raw (any other exception). A native crash
kills this process; the parent sees the signal. Native stdout is moved to stderr so it cannot
corrupt the answers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, TextIO


def _open_checkpoint_folder(folder: Path) -> None:
    import edgellm
    from edgellm.isolate import open_once

    edgellm.inspect(folder)
    out = Path(tempfile.mkdtemp(prefix="fuzz-out-")) / "out"
    try:
        try:
            edgellm.convert(folder, out, format="gguf", quant="f32", verify=False)
        except Exception:
            if out.exists():  # a failed conversion must leave nothing at the output
                raise AssertionError(f"partial output left at {out}") from None
            raise
        open_once(out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def handle(case: dict[str, Any]) -> dict[str, Any]:
    """Open one case's file; classify how it ended (the worker survives everything but a crash)."""
    from edgellm.errors import EdgeLLMError
    from edgellm.isolate import open_once

    try:
        if case["kind"] == "gguf":
            open_once(case["path"])
        else:
            _open_checkpoint_folder(Path(case["path"]))
        return {"status": "ok"}
    except EdgeLLMError as exc:
        text = str(exc)
        return {"status": "edgellm", "error": type(exc).__name__, "message": text[:400],
                "multiline": "\n" in text.strip()}
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        where = traceback.extract_tb(exc.__traceback__)[-3:]
        return {"status": "raw", "error": type(exc).__name__, "message": str(exc)[:400],
                "where": [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in where]}


def main() -> int:
    answers: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything native writes to stdout goes to the worker's log
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(handle(json.loads(line))) + "\n")
            answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
