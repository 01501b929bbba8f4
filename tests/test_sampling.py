"""The numpy sampler: greedy, seeds, the llama.cpp filter chain and parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.errors import InvalidInputError
from edgellm.runtimes.sampling import Sampler, SamplingParams, apply_repeat_penalty

OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # every filter off


def _logits(seed: int = 0, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def _from_probs(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float32))


def test_greedy_is_argmax_and_leaves_logits_alone() -> None:
    sampler = Sampler(SamplingParams(temperature=0))
    for seed in range(5):
        logits = _logits(seed)
        before = logits.copy()
        assert sampler.sample(logits) == int(np.argmax(logits))
        np.testing.assert_array_equal(logits, before)


def test_top_k_one_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    logits = _logits(1)
    assert {sampler.sample(logits) for _ in range(200)} == {int(np.argmax(logits))}


def test_same_seed_same_tokens() -> None:
    logits = _logits(2)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, **OFF))
        return [sampler.sample(logits) for _ in range(50)]

    assert draws(1234) == draws(1234)
    assert draws(1234) != draws(4321)


@pytest.mark.parametrize("filters", [OFF, {"top_k": 3, "top_p": 1.0, "min_p": 0.0}])
def test_draws_follow_the_distribution(filters: dict[str, float]) -> None:
    probs = [0.5, 0.3, 0.2]  # the no-filter path and the sorted path must agree
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0, **filters))  # type: ignore[arg-type]
    draws = np.bincount([sampler.sample(_from_probs(probs)) for _ in range(5000)], minlength=3) / 5000
    np.testing.assert_allclose(draws, probs, atol=0.03)


def test_filters_keep_the_right_candidates() -> None:
    logits = _from_probs([0.05, 0.5, 0.15, 0.3])
    def kept(**kw: float) -> list[int]:
        params = {**OFF, "temperature": 1.0, **kw}
        return sorted(Sampler(SamplingParams(**params)).distribution(logits)[0].tolist())  # type: ignore[arg-type]
    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.75) == [1, 3]  # 0.5 + 0.3 reaches 0.75
    assert kept(top_p=0.85) == [1, 2, 3]
    assert kept(min_p=0.35) == [1, 3]  # 0.15 < 0.35 * 0.5
    assert kept(top_k=3, min_p=0.2) == [1, 2, 3]


def _reference(logits: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """Straight llama.cpp chain over the fully sorted vocabulary."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    cand = logits[order].astype(np.float64)
    if p.top_k > 0:
        order, cand = order[: p.top_k], cand[: p.top_k]
    probs = np.exp(cand - cand[0]) / np.exp(cand - cand[0]).sum()
    if p.top_p < 1.0:
        cut = int(np.argmax(np.cumsum(probs) >= p.top_p)) + 1
        order, cand, probs = order[:cut], cand[:cut], probs[:cut]
    keep = probs >= p.min_p * probs[0]
    order, cand = order[keep], cand[keep]
    final = np.exp((cand - cand[0]) / p.temperature)
    return dict(zip(order.tolist(), (final / final.sum()).tolist(), strict=True))


def _cliff(n: int = 5000) -> np.ndarray:
    """A few likely tokens far above a flat floor (like the fake runtime's logits)."""
    logits = np.random.default_rng(5).uniform(-1, 1, n).astype(np.float32)
    logits[[10, 20, 30, 40]] = [20.0, 19.5, 19.0, 17.0]
    return logits


@pytest.mark.parametrize("kw", [
    {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "temperature": 0.8},
    {"top_k": 0, "top_p": 0.9, "min_p": 0.0, "temperature": 1.3},
    {"top_k": 0, "top_p": 0.5, "min_p": 0.1, "temperature": 0.5},
    {"top_k": 500, "top_p": 1.0, "min_p": 0.02, "temperature": 1.0},
    {"top_k": 2000, "top_p": 0.9, "min_p": 0.05, "temperature": 1.0},
    {"top_k": 3, "top_p": 0.99, "min_p": 0.0, "temperature": 2.0},
    {"top_k": 0, "top_p": 0.999, "min_p": 0.0, "temperature": 1.0},
    {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 0.7},
])
@pytest.mark.parametrize("make_logits", [lambda: _logits(7, 5000), _cliff])
def test_shortcuts_match_a_full_sort(kw: dict[str, float], make_logits) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    logits = make_logits()
    ids, probs = Sampler(params).distribution(logits)
    expected = _reference(logits, params)
    assert ids.tolist() == sorted(expected, key=lambda i: (-logits[i], i))  # same set, same order
    np.testing.assert_allclose(probs, [expected[i] for i in ids.tolist()], rtol=1e-6)


def test_repeat_penalty_llama_cpp_semantics() -> None:
    logits = np.array([2.0, -1.0, 1.5, 0.5], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 0], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 1.5, 0.5])  # positive divided, negative multiplied, once
    np.testing.assert_array_equal(logits, [2.0, -1.0, 1.5, 0.5])  # input untouched


def test_repeat_penalty_changes_greedy_choice_within_window() -> None:
    logits = np.array([2.0, -1.0, 1.5, 0.5], dtype=np.float32)
    penalised = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=2))
    assert penalised.sample(logits, [3, 0]) == 2
    assert penalised.sample(logits, [0, 3, 3]) == 0  # 0 fell out of the last-2 window
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [0, 0]) == 0  # penalty 1.0 is off


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_k", -1),
    ("top_k", 1.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 2.0),
    ("repeat_penalty", 0.0),
    ("repeat_penalty", -1.0),
    ("repeat_last_n", -1),
    ("seed", -5),
    ("seed", "42"),
])
def test_bad_params_name_the_value(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=f"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_negative_temperature_is_greedy() -> None:
    logits = _logits(3)
    assert Sampler(SamplingParams(temperature=-1.0)).sample(logits) == int(np.argmax(logits))


def test_plain_softmax_draw_over_a_large_vocabulary() -> None:
    logits = np.full(1000, -30.0, dtype=np.float32)
    logits[[300, 700]] = 0.0  # two equally likely tokens in different 256-blocks
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0, **OFF))
    draws = [sampler.sample(logits) for _ in range(400)]
    assert set(draws) == {300, 700}
    assert 0.4 < draws.count(300) / len(draws) < 0.6
