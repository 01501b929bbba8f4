"""``edgellm convert SRC --format gguf --quant TYPE -o OUT``: convert and verify a model."""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, Any

from edgellm.cli._common import add_command, format_bytes, print_json, read_prompts_file

__all__ = ["add_parser", "run", "ProgressBar"]

EXAMPLES = """examples:
  edgellm convert ./SmolLM2-135M-Instruct --quant Q8_0 -o ./smollm2-q8
  edgellm convert ./model --quant Q4_0 -o ./out --force --json"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert``."""
    p = add_command(subparsers, "convert",
                    "convert a Hugging Face checkpoint (or GGUF) for a device",
                    "Convert a Hugging Face checkpoint folder (or a GGUF file) into a runnable "
                    "artifact, verify it against the source, and write it atomically.\n\n"
                    + EXAMPLES)
    p.add_argument("src", metavar="SRC", help="HF checkpoint folder or .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--format", help="target format (default: gguf, or the plan's with --device)")
    p.add_argument("--device", metavar="PROFILE",
                   help="plan for this device profile (or this-host): its format and quantization "
                        "fill in --format/--quant when they are not given")
    p.add_argument("--quant", metavar="TYPE",
                   help="quantization type, e.g. f16, Q8_0, Q4_0 (default: the library's, f16)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle checkpoints (.bin/.pt), which can run arbitrary code")
    p.add_argument("--verify-with", metavar="HF_DIR",
                   help="HF checkpoint to measure parity against (default: SRC when it is one)")
    p.add_argument("--prompts-file", metavar="F", help="parity prompts, one per line")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the parity check (the manifest records that it was skipped)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    ov = p.add_argument_group("OpenVINO weight compression (--format openvino)")
    ov.add_argument("--npu", action="store_true",
                    help="target an Intel NPU: symmetric int4, channel-wise")
    sym = ov.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric int4/int8")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric int4/int8 (default)")
    ov.add_argument("--ratio", type=float, help="share of layers in int4, the rest int8 (0-1]")
    ov.add_argument("--calibration", metavar="TEXT_FILE",
                    help="UTF-8 text for data-aware int4 (paragraphs, or lines, are samples); "
                         "turns on AWQ and scale estimation")
    ov.add_argument("--no-awq", dest="awq", action="store_false", default=None,
                    help="with --calibration: skip AWQ")
    ov.add_argument("--no-scale-estimation", dest="scale_estimation", action="store_false",
                    default=None, help="with --calibration: skip scale estimation")
    ov.add_argument("--max-prompt-len", type=int, metavar="N",
                    help="with --npu: the NPU's static prompt length (default 1024)")
    ov.add_argument("--min-response-len", type=int, metavar="N",
                    help="with --npu: tokens guaranteed for the answer (default 128)")
    ox = p.add_argument_group("ONNX (--format onnx; MatMulNBits: --quant int4|int8, --sym/--asym too)")
    ox.add_argument("--exporter", choices=("builder", "optimum"),
                    help="builder: edgellm's fused graph, no torch (default where it covers the model); "
                         "optimum: the traced export")
    ox.add_argument("--block-size", type=int, metavar="N", help="MatMulNBits block: 32 (default), 64 or 128")
    ox.add_argument("--accuracy-level", type=int, metavar="L",
                    help="MatMulNBits compute: 4 = int8 activations (default, fast on CPU), 0 = float")
    return p


class ProgressBar:
    """A one-line progress bar for ``(done_bytes, total_bytes, name)`` callbacks.

    Draws on ``stream`` only when it is a terminal, at most every ``min_interval_s``
    (plus the final 100 %), so piping the CLI's output never fills a log with ``\\r``.
    """

    def __init__(self, stream: IO[str] | None = None, width: int = 30,
                 min_interval_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.min_interval_s = min_interval_s
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done_bytes: int, total_bytes: int, name: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = total_bytes > 0 and done_bytes >= total_bytes
        if not finished and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        frac = min(1.0, done_bytes / total_bytes) if total_bytes > 0 else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        label = (name[:28] + "..") if len(name) > 30 else name
        self.stream.write(f"\r{label:<30} [{bar}] {frac:4.0%} "
                          f"{format_bytes(done_bytes)}/{format_bytes(total_bytes)}   ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` and print where the artifact went (and its parity)."""
    import edgellm

    kwargs: dict[str, Any] = {} if args.quant is None else {"quant": args.quant}
    if args.no_verify:
        kwargs["verify"] = False
    for name in ("sym", "ratio", "calibration", "awq", "scale_estimation", "max_prompt_len",
                 "min_response_len", "block_size", "accuracy_level", "exporter"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "npu", False):
        kwargs["npu"] = True
    bar = ProgressBar()
    try:
        artifact = edgellm.convert(
            args.src, args.output, format=args.format or (None if args.device else "gguf"),
            device=args.device, force=args.force,
            allow_pickle=args.allow_pickle, verify_with=args.verify_with,
            prompts=read_prompts_file(args.prompts_file), progress=bar, **kwargs,
        )
    finally:
        bar.close()
    data = {
        "path": str(artifact.path),
        "format": artifact.format.value,
        "model_file": str(artifact.model_file),
        "size_bytes": artifact.size_bytes,
        "manifest": artifact.manifest,
    }
    if args.json:
        print_json(data)
        return 0
    print(f"wrote {data['path']} ({data['format']}, {artifact.quantization or '?'}, "
          f"{format_bytes(data['size_bytes'])})")
    parity = artifact.manifest.get("parity")
    if isinstance(parity, dict) and parity:
        from edgellm.cli.verify import format_parity

        print(format_parity(parity))
    return 0
