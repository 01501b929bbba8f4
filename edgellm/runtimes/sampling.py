"""Token sampling in numpy, the same on every backend.

The chain follows llama.cpp's default order (``common/sampling.cpp``): repetition
penalty, top-k, top-p, min-p, temperature, then one draw. ``temperature <= 0`` is greedy
decoding: one ``argmax`` over the logits, no copy, so the loop's own cost per token stays
far below a forward pass. The logits handed in are never modified (a backend may return
a view of its own buffer).

Only the candidates that survive min-p (a threshold on the logits) and top-k
(``argpartition``) are ever sorted; the result is the one a full sort of the vocabulary
gives (top-p's normaliser to a relative 1e-7). Greedy decoding is a single ``argmax``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgellm.errors import InvalidInputError

__all__ = ["Sampler", "SamplingParams", "apply_repeat_penalty", "check_seed"]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def check_seed(seed: object) -> int | None:
    """``seed`` if it is None or an int >= 0 (any size: numpy seeds from all its bits).

    A negative seed is refused rather than folded: llama.cpp's ``-1`` means "random", which
    is ``None`` here, and folding it into a fixed 64-bit value would silently do the opposite.
    """
    if seed is None or (_is_int(seed) and seed >= 0):  # type: ignore[operator]
        return seed  # type: ignore[return-value]
    hint = " (llama.cpp's -1 for a random seed is seed=None here)" if _is_int(seed) else ""
    raise InvalidInputError(
        f"seed={seed!r:.40} is not a seed; pass None for fresh entropy or an int >= 0{hint}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    - ``temperature``: <= 0 means greedy (argmax); otherwise logits are divided by it.
    - ``top_k``: keep the k most likely tokens; 0 turns the filter off.
    - ``top_p``: keep the smallest set whose probability reaches p, in (0, 1]; 1 is off.
    - ``min_p``: drop tokens less likely than ``min_p`` times the best one, in [0, 1].
    - ``repeat_penalty``: > 0; 1 is off. llama.cpp semantics: over the last
      ``repeat_last_n`` tokens (prompt included), a positive logit is divided by it, a
      negative one multiplied.
    - ``seed``: None draws from fresh entropy; an int makes the draws reproducible.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("temperature", _is_real(self.temperature) and math.isfinite(self.temperature),
             "a finite number (<= 0 for greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 turns top-k off)"),
            ("top_p", _is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
             "a number in (0, 1] (1 turns top-p off)"),
            ("min_p", _is_real(self.min_p) and 0.0 <= self.min_p <= 1.0,
             "a number in [0, 1] (0 turns min-p off)"),
            ("repeat_penalty",
             _is_real(self.repeat_penalty) and math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
             "a number > 0 (1.0 turns it off)"),
            ("repeat_last_n", _is_int(self.repeat_last_n) and self.repeat_last_n >= 0, "an int >= 0"),
        )
        check_seed(self.seed)
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidInputError(
                    f"invalid sampling parameter {name}={getattr(self, name)!r}; it must be {allowed}"
                )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0 or self.top_k == 1


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of ``logits`` with llama.cpp's repetition penalty on the ``recent`` ids.

    Each distinct id is penalised once: positive logits divided by ``penalty``, others
    multiplied by it. Ids outside the logits (e.g. added tokens beyond a padded
    vocabulary) are ignored.
    """
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = np.array(logits, dtype=np.float32, copy=True)
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _top_k_mass(logits: np.ndarray, k: int, top: float) -> float:
    """Sum of exp(l - top) over the k largest logits, relative error below e^-16.

    Only logits within ``16 + ln k`` of the maximum are summed: together the others weigh
    less than k * e^-(16 + ln k) = e^-16 of the top token. Most of a real vocabulary lies
    below that line, so this avoids partitioning or exponentiating all of it.
    """
    n = logits.shape[-1]
    above = logits >= top - (16.0 + math.log(k))
    if np.count_nonzero(above) > n // 4:  # copying a large selection costs more than this
        near = np.partition(logits, n - k)[n - k :] if k < n else logits
    else:
        near = logits[above]
        if len(near) > k:
            near = np.partition(near, len(near) - k)[len(near) - k :]
    return float(np.exp(near - np.float32(top)).sum(dtype=np.float64))


def _nucleus_superset(logits: np.ndarray, top: float, top_p: float) -> tuple[np.ndarray, float]:
    """Ids above a logit line whose mass already reaches ``top_p``, and the total mass.

    The top-p nucleus is the most likely prefix of the sorted vocabulary, so it lies
    inside any such set; trying a few lines avoids sorting the whole vocabulary.
    """
    weights = np.exp(logits - np.float32(top))
    total = float(weights.sum(dtype=np.float64))
    for gap in (2.0, 4.0, 8.0, 16.0):
        mask = logits >= top - gap
        if weights[mask].sum(dtype=np.float64) >= top_p * total:
            return np.flatnonzero(mask), total
    return np.arange(logits.shape[-1]), total


_BLOCK = 256


def _pick(weights: np.ndarray, u: float) -> int:
    """Index drawn with probability proportional to ``weights``, for ``u`` in [0, 1).

    A cumulative sum over a whole vocabulary is slow in numpy (~1 ms for 50k in float64),
    so this sums blocks of 256, picks a block, then searches inside it.
    """
    n = len(weights)
    blocks = np.cumsum(np.add.reduceat(weights, np.arange(0, n, _BLOCK)), dtype=np.float64)
    target = u * blocks[-1]
    b = min(int(np.searchsorted(blocks, target, side="right")), len(blocks) - 1)
    start = b * _BLOCK
    inner = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64)
    inner += blocks[b - 1] if b else 0.0
    return start + min(int(np.searchsorted(inner, target, side="right")), len(inner) - 1)


class Sampler:
    """Draws tokens for one generation; holds the seeded random generator."""

    __slots__ = ("_rng", "params")

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id from 1-D ``logits``; ``history`` feeds the repetition penalty."""
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and history:
            logits = apply_repeat_penalty(logits, history[-p.repeat_last_n :], p.repeat_penalty)
        if p.greedy:
            return int(logits.argmax())
        return self._draw(logits)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids (most likely first) and their probabilities after the filters.

        Top-k, top-p and min-p, then temperature; the repetition penalty is not applied
        here. Same numbers as sorting the whole vocabulary, without doing so: min-p is a
        threshold on the logits (p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p)),
        applied first with one comparison; only the survivors are partitioned and sorted.
        """
        p = self.params
        k = p.top_k if 0 < p.top_k < logits.shape[-1] else logits.shape[-1]
        top = float(logits.max())
        ids, mass = self._candidates(logits, top, k)
        cand = logits[ids].astype(np.float64)
        order = np.lexsort((ids, -cand))  # by logit, ties by id, like a stable full sort
        ids, cand = ids[order], cand[order]
        if p.top_p < 1.0:
            # top-p is measured against the mass of the whole top-k set (llama.cpp renormalises
            # after top-k), part of which min-p may already have pruned.
            weights = np.exp(cand - top)
            if mass is None:
                mass = weights.sum() if len(ids) == k else _top_k_mass(logits, k, top)
            cut = int(np.searchsorted(np.cumsum(weights) / mass, p.top_p)) + 1
            ids, cand = ids[:cut], cand[:cut]
        probs = np.exp((cand - cand[0]) / self._temperature)
        return ids, probs / probs.sum()

    @property
    def _temperature(self) -> float:
        return self.params.temperature if self.params.temperature > 0 else 1.0

    def _candidates(self, logits: np.ndarray, top: float, k: int) -> tuple[np.ndarray, float | None]:
        """Ids that can survive the filters (unsorted), and the top-k mass if it is known."""
        p, n = self.params, logits.shape[-1]
        if p.min_p > 0.0:
            ids = np.flatnonzero(logits >= top + math.log(p.min_p))
            if len(ids) > k:
                ids = ids[np.argpartition(logits[ids], len(ids) - k)[len(ids) - k :]]
            return ids, None
        if k < n:
            return np.argpartition(logits, n - k)[n - k :], None
        if p.top_p < 1.0:
            return _nucleus_superset(logits, top, p.top_p)
        return np.arange(n), None

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        if p.top_k == 0 and p.min_p == 0.0 and p.top_p >= 1.0:  # plain softmax: no sort needed
            top = np.float32(logits.max())
            weights = np.exp((logits - top) / np.float32(self._temperature))
            return _pick(weights, self._rng.random())
        ids, probs = self.distribution(logits)
        pick = int(np.searchsorted(np.cumsum(probs), self._rng.random(), side="right"))
        return int(ids[min(pick, len(ids) - 1)])
