"""Parity: does the converted artifact still compute what the source computed?

The same token ids go through the artifact (any registered backend) and through
transformers on the Hugging Face reference. Measured per run:

* ``top1_agreement``: share of positions where both pick the same next token, with the
  reference's own greedy continuation teacher-forced into both (so one early flip does
  not poison every later position);
* ``max_abs_logit_diff`` and ``mean_kl`` (KL(reference || artifact), nats per position);
* ``greedy_identical``: prompts on which free-running greedy decoding of the artifact
  reproduces the reference's tokens exactly.

transformers and torch are imported only here (the ``convert`` extra).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.artifact import find_artifact, read_manifest, write_manifest
from edgellm.errors import MissingDependencyError, NoCompatibleRuntimeError, VerificationError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPTS", "ParityReport", "measure_parity", "verify_artifact", "check_after_convert"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 multiplied by 23?\nA:",
    "Photosynthesis is the process by which plants",
)
N_GREEDY = 32

#: Minimum top-1 agreement a fresh conversion must reach, by output type. A lower
#: number means the converter got the graph wrong, not that precision was lost.
CONVERSION_GATES: dict[str, float] = {"F32": 0.98, "F16": 0.90, "BF16": 0.85, "FP32": 0.98, "FP16": 0.90}
#: The gate when llama.cpp running a (quantized) GGUF is the reference: its own arithmetic
#: (8-bit activations against the quantized blocks) is in the reference logits. Measured: fp32
#: ONNX builds of SmolLM2 GGUFs, whose weights equal the dequantized GGUF exactly, agree on
#: 0.956 (Q4_1, max |dlogit| 1.6), 0.975 (Q8_0, 1.7) and 0.975 (Q4_K_M, 3.0) of positions — so
#: 0.98 would refuse right conversions; a wrong graph agrees on few.
GGUF_REFERENCE_GATE = 0.85


@dataclass(frozen=True)
class ParityReport:
    """Parity of an artifact against its reference (numbers, not hope)."""

    top1_agreement: float
    max_abs_logit_diff: float
    mean_kl: float
    greedy_identical: int
    n_prompts: int
    n_positions: int
    n_greedy_tokens: int
    reference: str
    backend: str
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    reference_by: str = "transformers"  # or "llama.cpp" (a GGUF reference)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what the manifest records)."""
        return {"status": "measured", **asdict(self)}


def _softmax_log(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Reference:
    """transformers on a HF checkpoint: full-sequence logits and greedy continuation."""

    by = "transformers"

    def __init__(self, folder: Path) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise MissingDependencyError("transformers", "convert", "parity verification") from None
        from edgellm.runtimes.threads import env_threads

        self.torch = torch
        torch.set_num_threads(env_threads() or max(1, os.cpu_count() or 1))
        # eager attention is the model's reference math: SDPA skips Gemma 2's soft-capping
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([list(ids)]), use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        with self.torch.inference_mode():
            out = self.model.generate(
                self.torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False,
                attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                pad_token_id=0, eos_token_id=None,
            )
        return out[0, len(ids):].tolist()

    def close(self) -> None:
        """Nothing to release (the model goes with the object)."""


class _GGUFReference:
    """llama.cpp running a GGUF file: the reference for a GGUF source when transformers is absent.

    Looser than transformers on the dequantized weights: llama.cpp's own arithmetic (quantized
    dot products against 8-bit activations, mixed-precision accumulation) is in its logits, so
    the manifest names which reference was used.
    """

    by = "llama.cpp"

    def __init__(self, path: Path) -> None:
        from edgellm.runtimes.base import RuntimeOptions, open_runtime

        self.runtime = open_runtime(path, "gguf", RuntimeOptions(n_ctx=512, kv_precision="f32"))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.runtime.reset()
        return self.runtime.forward(list(ids), all_logits=True)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        return _artifact_greedy(self.runtime, ids, n)

    def close(self) -> None:
        self.runtime.close()


def is_gguf_reference(reference: Path) -> bool:
    """A GGUF file (run by llama.cpp) rather than a Hugging Face folder (run by transformers)."""
    return reference.is_file() and reference.suffix.lower() == ".gguf"


def transformers_available() -> bool:
    """Whether the transformers reference can run here (torch and transformers import)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _artifact_greedy(runtime: Any, ids: Sequence[int], n: int) -> list[int]:
    runtime.reset()
    logits = runtime.forward(list(ids))
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = runtime.forward([tok])
    return out


def _divergence(mine: list[int], cont: list[int], ref_logits: np.ndarray) -> dict[str, Any]:
    """Where free-running greedy first left the reference, and how close the call was there.

    ``ref_margin`` is the reference's own top-1 minus top-2 logit at that step: a flip where
    it is below the artifact's logit error is a tie, not a conversion fault.
    """
    for i, (a, b) in enumerate(zip(mine, cont, strict=False)):  # compare the common prefix
        if a != b:
            top2 = np.sort(ref_logits[i])[-2:]
            return {"first_divergence": i, "ref_margin": float(top2[1] - top2[0])}
    return {"first_divergence": None, "ref_margin": None}


def measure_parity(runtime: Any, reference: Path, prompts: Sequence[str] | None = None,
                   n_greedy: int = N_GREEDY) -> ParityReport:
    """Compare an open runtime with ``reference`` over ``prompts``: transformers on a Hugging Face
    folder, or llama.cpp on a GGUF file."""
    ref: Any = _GGUFReference(reference) if is_gguf_reference(reference) else _Reference(reference)
    try:
        return _measure(runtime, ref, str(reference), list(prompts or DEFAULT_PROMPTS), n_greedy)
    finally:
        ref.close()


def _measure(runtime: Any, ref: Any, reference: str, prompts: list[str], n_greedy: int) -> ParityReport:
    agree = positions = greedy_same = 0
    max_diff = 0.0
    kls: list[float] = []
    per_prompt = []
    for prompt in prompts:
        ids = runtime.tokenizer.encode(prompt, add_special=True)
        cont = ref.greedy(ids, n_greedy)
        full = list(ids) + cont[:-1]
        ref_logits = ref.logits(full)
        runtime.reset()
        art_logits = runtime.forward(full, all_logits=True)
        start = len(ids) - 1
        r, a = ref_logits[start:], art_logits[start:, : ref_logits.shape[1]]
        hits = int((r.argmax(-1) == a.argmax(-1)).sum())
        lr, la = _softmax_log(r), _softmax_log(a)
        kl = float((np.exp(lr) * (lr - la)).sum(-1).mean())
        diff = float(np.abs(r - a).max())
        mine = _artifact_greedy(runtime, ids, n_greedy)
        same = mine == cont
        agree, positions, greedy_same = agree + hits, positions + len(r), greedy_same + int(same)
        max_diff, kls = max(max_diff, diff), kls + [kl]
        per_prompt.append({"prompt": prompt, "top1": hits / len(r), "kl": kl, "max_abs_diff": diff,
                           "greedy_identical": same, **_divergence(mine, cont, r)})
    runtime.reset()
    return ParityReport(
        top1_agreement=agree / positions, max_abs_logit_diff=max_diff, mean_kl=float(np.mean(kls)),
        greedy_identical=greedy_same, n_prompts=len(prompts), n_positions=positions,
        n_greedy_tokens=n_greedy, reference=reference, backend=getattr(runtime, "backend", "?"),
        per_prompt=per_prompt, reference_by=ref.by,
    )


#: Runtime options for measuring a *conversion*: full-precision compute and KV cache where the
#: backend would otherwise lower them, so the numbers describe the weights, not the runtime.
PARITY_OPTIONS: dict[str, dict[str, Any]] = {
    "openvino": {"precision": "f32", "kv_precision": "f32"},
}


def _open(model_file: Path, fmt: str) -> Any:
    from edgellm.runtimes.base import RuntimeOptions, open_runtime

    extra = dict(PARITY_OPTIONS.get(fmt, {}))
    kv = extra.pop("kv_precision", None)
    return open_runtime(model_file, fmt, RuntimeOptions(n_ctx=512, kv_precision=kv, extra=extra))


def verify_artifact(path: Path, reference: Path, prompts: Sequence[str] | None = None,
                    record: bool = True) -> ParityReport:
    """Measure an artifact against a reference (HF folder, or a GGUF file run by llama.cpp) and
    (optionally) record it in the manifest."""
    from edgellm.spec import ModelSpec

    artifact = find_artifact(path)
    if not is_gguf_reference(reference):
        ModelSpec.from_hf_dir(reference)  # a clear error if the reference is not a checkpoint
    runtime = _open(artifact.model_file, artifact.format.value)
    try:
        report = measure_parity(runtime, reference, prompts)
    finally:
        runtime.close()
    if record and artifact.path.is_dir() and (artifact.path / "edgellm.json").is_file():
        manifest = read_manifest(artifact.path)
        manifest["parity"] = report.to_dict()
        write_manifest(artifact.path, manifest)
    return report


def check_after_convert(model_file: Path, reference: Path | None, quant: str,
                        prompts: Sequence[str] | None, fmt: str = "gguf") -> dict[str, Any]:
    """Parity of a freshly written artifact, gated for lossless types; a skip says why."""
    if reference is None:
        return {"status": "skipped", "reason": "no Hugging Face reference; run: edgellm verify "
                "ARTIFACT --reference HF_DIR"}
    try:
        runtime = _open(model_file, fmt)
    except MissingDependencyError as exc:
        return {"status": "skipped", "reason": str(exc)}
    try:
        report = measure_parity(runtime, reference, prompts)
    except (MissingDependencyError, NoCompatibleRuntimeError) as exc:  # no transformers / no llama.cpp
        return {"status": "skipped", "reason": str(exc)}
    finally:
        runtime.close()
    gate = CONVERSION_GATES.get(quant)
    if gate is not None and report.reference_by == _GGUFReference.by:
        gate = min(gate, GGUF_REFERENCE_GATE)
    if gate is not None and report.top1_agreement < gate:
        raise VerificationError(
            f"{model_file.name}: top-1 agreement {report.top1_agreement:.3f} with {report.reference_by} is "
            f"below {gate} for {quant} (max |dlogit| {report.max_abs_logit_diff:.3g}); the conversion "
            "is wrong for this model — please report it; nothing was written"
        )
    return report.to_dict()
