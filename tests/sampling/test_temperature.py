"""Statistical tests of likelihood-free temperature sampling (calmlm.sampling.temperature).

Every test is seeded, so its outcome is fixed; the thresholds are still chosen as if it were not:
chi-square tests reject above the 1 - 1e-7 quantile (Wilson-Hilferty), mean-draw tests allow 6
standard errors, so a correct sampler would fail a given test for fewer than 1 seed in a million.
Each bound is paired with a deliberately wrong variant that the same statistic must reject.
"""

from __future__ import annotations

import math

import pytest
import torch

from calmlm.sampling import temperature as sampling
from calmlm.errors import CalmError, GenerationError
from calmlm.sampling.temperature import (
    batch_temperature_sample,
    exact_temperature_sample,
    exact_temperature_sample_batch,
    expected_exact_draws,
    split_inverse_temperature,
)

NUM = 50
ZIPF = torch.arange(1, NUM + 1, dtype=torch.float64) ** -1.1
ZIPF /= ZIPF.sum()
CDF = ZIPF.cumsum(0)
Z_1E7 = 5.199337582  # one-sided standard normal quantile for 1e-7
Z_MEAN = 6.0  # two-sided normal tail 2e-9


def target(temperature: float, probs: torch.Tensor = ZIPF) -> torch.Tensor:
    q = probs ** (1.0 / temperature)
    return q / q.sum()


def zipf(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.searchsorted(CDF, u).clamp_max(NUM - 1)


def chi2_threshold(dof: int) -> float:
    """Upper 1e-7 quantile of chi-square(dof), Wilson-Hilferty. Checked against scipy for dof 1-199: never
    below the exact quantile (false-alarm rate ≤ 1e-7), e.g. 119.4 vs 118.8 at dof 49."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + Z_1E7 * math.sqrt(c)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson statistic and its 1e-7 threshold; bins expecting < 5 are pooled. A hit on a
    zero-probability outcome gives an infinite statistic."""
    counts, probs = counts.double(), probs.double()
    total = float(counts.sum())
    if bool((counts[probs == 0] > 0).any()):
        return math.inf, 0.0
    expected = probs * total
    order = expected.argsort(descending=True)
    e, c = expected[order], counts[order]
    keep = int((e >= 5).sum())
    assert keep >= 2, "sample too small for a chi-square test"
    e_bins, c_bins = list(e[:keep]), list(c[:keep])
    rest_e, rest_c = float(e[keep:].sum()), float(c[keep:].sum())
    if rest_e >= 5:
        e_bins.append(rest_e)
        c_bins.append(rest_c)
    else:  # too small for its own bin: fold into the smallest kept bin
        e_bins[-1] = e_bins[-1] + rest_e
        c_bins[-1] = c_bins[-1] + rest_c
    stat = sum(float((ci - ei) ** 2 / ei) for ci, ei in zip(c_bins, e_bins))
    return stat, chi2_threshold(len(e_bins) - 1)


class ZipfDraws:
    """draw_batch(m, active) for the exact batch sampler: m Zipf draws per active position."""

    def __init__(self, seed: int, rows: torch.Tensor | None = None) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = rows  # optional table mapping outcome -> K-token row
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, m: int, active: torch.Tensor) -> torch.Tensor:
        self.calls.append((m, active.clone()))
        idx = zipf(self.generator, (active.numel(), m))
        return idx if self.rows is None else self.rows[idx]


def exact_batch_stat(temperature: float, positions: int, seed: int) -> tuple[float, float, torch.Tensor]:
    samples, draws = exact_temperature_sample_batch(
        ZipfDraws(seed), positions, temperature, generator=torch.Generator().manual_seed(seed + 1)
    )
    stat, threshold = chi2(torch.bincount(samples, minlength=NUM), target(temperature))
    return stat, threshold, draws


def wrong_factory(alpha: float, i):  # the off-by-one the tests must catch
    return alpha / (i + 1)


# ------------------------------------------------------------------------------------------------
# temperature handling and the draw-count formula
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "n", "alpha"),
    [(1.0, 1, 0.0), (1, 1, 0.0), (0.5, 2, 0.0), (1 / 3, 3, 0.0), (1 / 7, 7, 0.0), (0.1, 10, 0.0),
     (0.8, 1, 0.25), (0.37, 2, 1 / 0.37 - 2), (0.4, 2, 0.5)],
)
def test_split_inverse_temperature(temperature: float, n: int, alpha: float) -> None:
    got_n, got_alpha = split_inverse_temperature(temperature)
    assert got_n == n
    if alpha == 0.0:
        assert got_alpha == 0.0  # exactly: no factory for float noise in 1/T
    else:
        assert got_alpha == pytest.approx(alpha, abs=1e-12)


BAD_TEMPERATURES = [0, 0.0, -0.5, 1.5, 1.0000001, float("nan"), float("inf"), True, "0.5", None]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_bad_temperature_raises_everywhere(temperature) -> None:
    pool = torch.zeros(2, 5, dtype=torch.long)
    calls = [
        lambda: split_inverse_temperature(temperature),
        lambda: exact_temperature_sample(lambda: 0, temperature),
        lambda: exact_temperature_sample_batch(lambda m, active: torch.zeros(len(active), m), 2, temperature),
        lambda: batch_temperature_sample(pool, temperature),
        lambda: expected_exact_draws(ZIPF, temperature),
    ]
    for call in calls:
        with pytest.raises(GenerationError, match=r"temperature"):
            call()
    assert issubclass(GenerationError, CalmError)


def test_other_bad_inputs_raise() -> None:
    with pytest.raises(GenerationError, match="empty"):
        batch_temperature_sample(torch.zeros(3, 0, dtype=torch.long), 0.5)
    with pytest.raises(GenerationError, match="empty"):
        batch_temperature_sample(torch.zeros(0, 4, dtype=torch.long), 0.5)
    with pytest.raises(GenerationError, match="pool must be"):
        batch_temperature_sample(torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(GenerationError, match="max_draws"):
        exact_temperature_sample(lambda: 0, 0.5, max_draws=0)
    with pytest.raises(GenerationError, match="proposals_per_round"):
        exact_temperature_sample_batch(lambda m, active: torch.zeros(len(active), m), 2, 0.5, proposals_per_round=0)
    with pytest.raises(GenerationError, match="shape"):
        exact_temperature_sample_batch(lambda m, active: torch.zeros(len(active), m + 1), 2, 0.5)
    with pytest.raises(GenerationError, match="probs"):
        expected_exact_draws(torch.tensor([0.5, 0.6]), 0.5)


def test_factory_series_has_closed_form() -> None:
    """E[factory draws | x] = Σ_{i≥1} Π_{j<i} (1-p)(1-α/j), truncated, equals p^(α-1)."""
    for p in (0.9, 0.3, 0.01):
        for alpha in (0.25, 0.5, 0.7027):
            term, total, i = 1.0, 0.0, 1
            while term > 1e-15:
                total += term
                term *= (1 - p) * (1 - alpha / i)
                i += 1
            assert total == pytest.approx(p ** (alpha - 1), rel=1e-10)


def test_expected_draws_known_cases() -> None:
    assert expected_exact_draws(ZIPF, 1.0) == pytest.approx(1.0)
    # n = 2, α = 0: every attempt costs exactly 2 draws and succeeds with probability Σ p².
    assert expected_exact_draws(ZIPF, 0.5) == pytest.approx(2 / float((ZIPF**2).sum()))
    # A point mass needs n draws and (α > 0) one factory draw.
    assert expected_exact_draws(torch.tensor([1.0, 0.0]), 0.37) == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------
# exact sampler, scalar (Algorithm 1)
# ------------------------------------------------------------------------------------------------


class Stream:
    """A fast Python draw() over pre-generated Zipf samples (refilled on demand)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: list[int] = []
        self.pos = 0

    def __call__(self) -> int:
        if self.pos == len(self.buffer):
            self.buffer, self.pos = zipf(self.generator, (100_000,)).tolist(), 0
        self.pos += 1
        return self.buffer[self.pos - 1]


@pytest.mark.parametrize("temperature", [1.0, 0.8, 0.5, 0.37])
def test_scalar_exact_distribution_and_mean_draws(temperature: float) -> None:
    n_samples = 5000
    draw, g = Stream(seed=11), torch.Generator().manual_seed(12)
    results = [exact_temperature_sample(draw, temperature, generator=g) for _ in range(n_samples)]
    values = torch.tensor([r[0] for r in results])
    draws = torch.tensor([r[1] for r in results], dtype=torch.float64)
    stat, threshold = chi2(torch.bincount(values, minlength=NUM), target(temperature))
    assert stat < threshold, f"distribution off: chi2 {stat:.1f} ≥ {threshold:.1f}"
    expected = expected_exact_draws(ZIPF, temperature)
    if temperature == 1.0:
        assert bool((draws == 1).all())
    else:
        bound = Z_MEAN * float(draws.std()) / math.sqrt(n_samples)
        assert abs(float(draws.mean()) - expected) < bound, (float(draws.mean()), expected, bound)


def test_scalar_mean_draws_rejects_off_by_one_factory(monkeypatch) -> None:
    """The mean-draws statistic of the test above, at T=0.37 with α/(i+1) in the factory: the wrong
    factory accepts more often, so the mean is ≈ 46 draws instead of 67.9 (z ≈ -37 against 6)."""
    monkeypatch.setattr(sampling, "_factory_reject_prob", wrong_factory)
    draw, g = Stream(seed=11), torch.Generator().manual_seed(12)
    draws = torch.tensor([exact_temperature_sample(draw, 0.37, generator=g)[1] for _ in range(5000)], dtype=torch.float64)
    bound = Z_MEAN * float(draws.std()) / math.sqrt(5000)
    assert abs(float(draws.mean()) - expected_exact_draws(ZIPF, 0.37)) > bound


def test_scalar_reproducible_and_tensor_samples() -> None:
    rows = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    def run(seed: int) -> list:
        draw_g, g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        draw = lambda: rows[int(torch.rand((), generator=draw_g) < 0.3)]  # noqa: E731
        return [exact_temperature_sample(draw, 0.4, generator=g) for _ in range(50)]
    a, b = run(3), run(3)
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert all(any(torch.equal(x[0], r) for r in rows) for x in a)


def test_scalar_max_draws_guard() -> None:
    counter = iter(range(10**9))  # never repeats: stage 1 can never pass at T < 1
    with pytest.raises(GenerationError, match="max_draws=100"):
        exact_temperature_sample(lambda: next(counter), 0.5, max_draws=100)
    assert exact_temperature_sample(lambda: next(counter), 1.0, max_draws=1)[1] == 1


# ------------------------------------------------------------------------------------------------
# exact sampler, vectorised over positions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "positions"), [(1.0, 40_000), (0.5, 40_000), (0.37, 40_000), (0.8, 120_000)])
def test_batch_exact_distribution(temperature: float, positions: int) -> None:
    stat, threshold, draws = exact_batch_stat(temperature, positions, seed=21)
    assert stat < threshold, f"distribution off: chi2 {stat:.1f} ≥ {threshold:.1f}"
    if temperature == 1.0:
        assert bool((draws == 1).all())


@pytest.mark.parametrize(("temperature", "positions"), [(0.37, 40_000), (0.8, 120_000)])
def test_batch_exact_rejects_off_by_one_factory(monkeypatch, temperature: float, positions: int) -> None:
    """Same statistic and sample size as test_batch_exact_distribution, with α/(i+1) in the factory:
    the noncentrality is ≈ 410 (T=0.37) / ≈ 320 (T=0.8), i.e. an expected statistic ≈ 430 / ≈ 370 (sd ≈ 40)
    against thresholds of ≈ 70 / ≈ 120."""
    monkeypatch.setattr(sampling, "_factory_reject_prob", wrong_factory)
    stat, threshold, _ = exact_batch_stat(temperature, positions, seed=21)
    assert stat > threshold, f"off-by-one factory not detected: chi2 {stat:.1f} ≤ {threshold:.1f}"


def test_scalar_uses_the_same_factory_rule(monkeypatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(sampling, "_factory_reject_prob", lambda a, i: calls.append(i) or wrong_factory(a, i))
    exact_temperature_sample(Stream(seed=5), 0.8, generator=torch.Generator().manual_seed(6))
    assert calls and calls[0] == 1


def test_batch_exact_multidim_rows() -> None:
    """Samples are rows of K=4 ids compared on all columns: rows differing only in the last id are
    different outcomes."""
    g = torch.Generator().manual_seed(31)
    rows = torch.randint(0, 3, (NUM, 4), generator=g)
    rows[:, 3] = torch.arange(NUM)  # distinct rows, many sharing their first three ids
    samples, _ = exact_temperature_sample_batch(ZipfDraws(32, rows), 20_000, 0.37, generator=torch.Generator().manual_seed(33))
    assert samples.shape == (20_000, 4)
    hit = (samples[:, None, :] == rows[None]).all(-1)
    assert bool((hit.sum(1) == 1).all())
    stat, threshold = chi2(torch.bincount(hit.to(torch.uint8).argmax(1), minlength=NUM), target(0.37))
    assert stat < threshold


def test_batch_exact_finished_positions_stop_costing() -> None:
    inner = ZipfDraws(41)

    def draw(m: int, active: torch.Tensor) -> torch.Tensor:
        out = inner(m, active)
        out[active == 0] = 7  # position 0 always draws 7: accepted in the first round
        return out

    samples, draws = exact_temperature_sample_batch(draw, 64, 0.5, generator=torch.Generator().manual_seed(42), proposals_per_round=4)
    assert int(samples[0]) == 7 and int(draws[0]) == 4 * 2
    assert all(0 not in active.tolist() for _, active in inner.calls[1:])
    # draw counts are what was requested for each position
    total = sum(m * active.numel() for m, active in inner.calls)
    assert int(draws.sum()) == total


def test_batch_exact_is_reproducible() -> None:
    def make():
        g = torch.Generator().manual_seed(51)
        return lambda m, active: zipf(g, (active.numel(), m))

    a = exact_temperature_sample_batch(make(), 300, 0.8, generator=torch.Generator().manual_seed(52))
    b = exact_temperature_sample_batch(make(), 300, 0.8, generator=torch.Generator().manual_seed(52))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (300,)


def test_batch_exact_max_rounds_guard() -> None:
    counter = [0]

    def never_repeats(m: int, active: torch.Tensor) -> torch.Tensor:
        counter[0] += active.numel() * m
        return torch.arange(counter[0] - active.numel() * m, counter[0]).reshape(active.numel(), m)

    with pytest.raises(GenerationError, match="max_rounds=5"):
        exact_temperature_sample_batch(never_repeats, 3, 0.5, max_rounds=5)


# ------------------------------------------------------------------------------------------------
# batch approximation (Algorithm 2)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["numpy", "torch"])
def backend(request) -> str:
    """Run a batch-approximation test on the CPU numpy path and on the torch path (used on GPU)."""
    return request.param


def same_structure(key, rows: torch.Tensor) -> bool:
    key = torch.as_tensor(key)
    return torch.equal(key[:, :, None] == key[:, None, :], (rows[:, :, None] == rows[:, None, :]).all(-1))


@pytest.mark.parametrize(
    ("dtype", "low", "high", "dims"),
    [(torch.int64, 0, 32_000, 4), (torch.int64, -5, 5, 3), (torch.int8, -128, 127, 4), (torch.uint8, 0, 3, 8),
     (torch.int32, -(2**31), 2**31 - 1, 2), (torch.int64, -(2**62), 2**62, 2), (torch.bool, 0, 2, 5),
     (torch.int16, 0, 7, 1)],
)
def test_row_packing_is_exact(dtype: torch.dtype, low: int, high: int, dims: int) -> None:
    """Packed keys (numpy and torch variants) are equal exactly when the whole rows are."""
    g = torch.Generator().manual_seed(60)
    values = torch.randint(low, high, (6, 40, dims), generator=g, dtype=torch.int64)
    values[:, ::3] = values[:, :1]  # plenty of repeats
    values[:, 1, 0] = low  # extremes of the range, so wrap-around in narrow dtypes is exercised
    values[:, 2, 0] = high - 1
    rows = values.to(dtype) if dtype != torch.bool else values.bool()
    for key in (sampling._pack_numpy(rows.numpy()), sampling._pack_rows(rows)):
        if key is None:  # ranges too wide for one int64: the lexicographic sort is used instead
            assert (high - low) ** dims > 2**62
        else:
            assert same_structure(key, rows)
    counts, perm = sampling._sorted_counts(rows)
    by_pairs = (rows[:, :, None] == rows[:, None, :]).all(-1).sum(-1)
    assert torch.equal(counts, by_pairs.gather(1, perm))


def replicate_and_sample(pool_row: torch.Tensor, temperature: float, positions: int, seed: int,
                         use_numpy: bool = True) -> torch.Tensor:
    pool = pool_row.unsqueeze(0).expand(positions, *pool_row.shape)
    return batch_temperature_sample(pool, temperature, generator=torch.Generator().manual_seed(seed), use_numpy=use_numpy)


@pytest.mark.parametrize(
    ("temperature", "weights"),
    [
        (1.0, [3, 2, 1]),  # T = 1: uniform over pool entries, i.e. ∝ count
        (0.5, [3, 1, 0]),  # C(3,2), C(2,2), C(1,2)
        (1 / 3, [1, 0, 0]),  # C(3,3)
        (0.25, [1, 0, 0]),  # n = 4 > max count 3: falls back to τ = 3, C(3,3) only
        (0.4, [math.gamma(4) / math.gamma(1.5), math.gamma(3) / math.gamma(0.5), 0]),  # τ = 2.5
    ],
)
def test_approx_weights(backend: str, temperature: float, weights: list[float]) -> None:
    pool_row = torch.tensor([0, 0, 0, 1, 1, 2])
    w = torch.tensor(weights, dtype=torch.float64)
    exact = sampling._selection_probs(pool_row[None], temperature)[0]
    per_value = torch.zeros(3, dtype=torch.float64).scatter_add_(0, pool_row, exact)
    assert torch.allclose(per_value, w / w.sum(), atol=1e-12)
    out = replicate_and_sample(pool_row, temperature, 20_000, seed=61, use_numpy=backend == "numpy")
    counts = torch.bincount(out, minlength=3)
    if int((w > 0).sum()) == 1:
        assert int(counts[w > 0].sum()) == 20_000
    else:
        stat, threshold = chi2(counts, w / w.sum())
        assert stat < threshold


def test_approx_fallback_all_distinct_is_uniform(backend: str) -> None:
    pool_row = torch.randperm(20, generator=torch.Generator().manual_seed(62)) * 3
    out = replicate_and_sample(pool_row, 0.5, 40_000, seed=63, use_numpy=backend == "numpy")
    counts = torch.bincount(out, minlength=60)[pool_row]
    assert int(counts.sum()) == 40_000
    stat, threshold = chi2(counts, torch.full((20,), 1 / 20))
    assert stat < threshold
    # the same statistic rejects "first pool entry wins" style bias: drop 2% mass onto entry 0
    biased = counts.clone()
    biased[0] += 800
    assert chi2(biased, torch.full((20,), 1 / 20))[0] > threshold


def test_approx_float_rows_use_lexicographic_path(backend: str) -> None:
    """Float rows (e.g. latent vectors) cannot be packed: they are sorted column by column."""
    base, near = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.5, -1.0, 2.5])
    pool_row = torch.stack([base, near, base, near, base, torch.tensor([9.0, 9.0, 9.0])])
    out = replicate_and_sample(pool_row, 0.5, 20_000, seed=68, use_numpy=backend == "numpy")
    is_base, is_near = (out == base).all(1), (out == near).all(1)
    assert bool((is_base | is_near).all())
    stat, threshold = chi2(torch.stack([is_base.sum(), is_near.sum()]), torch.tensor([0.75, 0.25]))
    assert stat < threshold


def test_approx_partial_fallback_picks_most_repeated(backend: str) -> None:
    """n = 3 but the largest count is 2: use C(c, 2), i.e. values 0 and 1 equally often."""
    pool_row = torch.tensor([0, 4, 1, 2, 0, 3, 1])
    out = replicate_and_sample(pool_row, 1 / 3, 20_000, seed=64, use_numpy=backend == "numpy")
    assert set(out.unique().tolist()) == {0, 1}
    share = float((out == 0).double().mean())
    assert abs(share - 0.5) < 5.33 * math.sqrt(0.25 / 20_000)


def test_approx_positions_are_independent_and_reproducible(backend: str) -> None:
    g = torch.Generator().manual_seed(65)
    pool = zipf(g, (64, 200))
    pool[0] = 7  # a position whose pool is constant must return 7
    pool[1, :150] = 3  # dominant value at T = 1/3
    a = batch_temperature_sample(pool, 1 / 3, generator=torch.Generator().manual_seed(66), use_numpy=backend == "numpy")
    b = batch_temperature_sample(pool, 1 / 3, generator=torch.Generator().manual_seed(66), use_numpy=backend == "numpy")
    assert torch.equal(a, b) and a.shape == (64,)
    assert int(a[0]) == 7
    assert bool((pool == a[:, None]).any(1).all())  # every output comes from its own pool


def test_approx_multidim_rows(backend: str) -> None:
    base = torch.tensor([5, 6, 7, 8])
    near = torch.tensor([5, 6, 7, 9])  # equal to base on 3 of 4 ids
    other = torch.tensor([1, 2, 3, 4])
    pool_row = torch.stack([base, base, base, near, near, other])  # counts 3, 2, 1
    out = replicate_and_sample(pool_row, 0.5, 20_000, seed=67, use_numpy=backend == "numpy")
    assert out.shape == (20_000, 4)
    is_base, is_near = (out == base).all(1), (out == near).all(1)
    assert bool((is_base | is_near).all())
    stat, threshold = chi2(torch.stack([is_base.sum(), is_near.sum()]), torch.tensor([0.75, 0.25]))
    assert stat < threshold  # C(3,2) : C(2,2); merging `near` into `base` would give 1 : 0


def rao_blackwell_output(temperature: float, n: int, total: int, g: torch.Generator, rule=None) -> torch.Tensor:
    """E[output distribution] of Algorithm 2 with pools of n Zipf draws, estimated over total/n pools
    from the exact per-pool selection probabilities (far less noisy than sampling one per pool)."""
    rule = rule or sampling._selection_probs
    pools = zipf(g, (total // n, n))
    probs = rule(pools, temperature)
    return torch.zeros(NUM, dtype=torch.float64).scatter_add_(0, pools.flatten(), probs.flatten()) / pools.shape[0]


def mixture_rule(pools: torch.Tensor, temperature: float) -> torch.Tensor:
    """A wrong rule for non-integer 1/T: use n with probability 1-α and n+1 with probability α."""
    n, alpha = split_inverse_temperature(temperature)
    low, high = sampling._selection_probs(pools, 1 / n), sampling._selection_probs(pools, 1 / (n + 1))
    return (1 - alpha) * low + alpha * high


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.37, 0.8])
def test_approx_converges_to_tempered_distribution(temperature: float) -> None:
    """TV(E[output], P^(1/T)/Z) shrinks with the pool size N (bias O(1/N)) down to the estimate's own
    noise, ≈ 0.002 with 1M draws per N. Over 25 seeds (sd ≤ 0.0011 everywhere) TV was 0.023-0.059
    at N=50, 0.003-0.016 at N=200 and ≤ 0.0033 at N=5000, while the wrong mixture rule stayed at
    ≥ 0.017 (T=0.37) / ≥ 0.047 (T=0.8) at N=5000: the bound 0.006 is > 10 sd from both sides."""
    bound = 0.006
    g = torch.Generator().manual_seed(71)
    q = target(temperature)
    tv = {n: 0.5 * float((rao_blackwell_output(temperature, n, 1_000_000, g) - q).abs().sum()) for n in (50, 200, 1000, 5000)}
    assert tv[50] > 0.015, tv  # a real small-N bias exists (so the test can see it shrink)
    assert tv[50] > 2 * tv[200] and tv[200] > tv[5000], tv
    assert tv[1000] < bound and tv[5000] < bound, tv
    if split_inverse_temperature(temperature)[1] > 0:
        wrong = rao_blackwell_output(temperature, 5000, 1_000_000, g, rule=mixture_rule)
        assert 0.5 * float((wrong - q).abs().sum()) > bound  # the same bound rejects a non-converging rule


@pytest.mark.parametrize("temperature", [0.37, 0.5])
def test_approx_sampling_matches_selection_probs_on_a_realistic_pool(backend: str, temperature: float) -> None:
    """Many distinct values with varied counts: the drawn frequencies follow the exact selection
    probabilities (which the convergence test checks against P^(1/T))."""
    pool_row = zipf(torch.Generator().manual_seed(69), (200,))
    probs = sampling._selection_probs(pool_row[None], temperature)[0]
    per_value = torch.zeros(NUM, dtype=torch.float64).scatter_add_(0, pool_row, probs)
    out = replicate_and_sample(pool_row, temperature, 40_000, seed=70, use_numpy=backend == "numpy")
    stat, threshold = chi2(torch.bincount(out, minlength=NUM), per_value)
    assert stat < threshold
    # the same test rejects sampling at the wrong temperature (T = 1: uniform over the pool)
    wrong = replicate_and_sample(pool_row, 1.0, 40_000, seed=70, use_numpy=backend == "numpy")
    assert chi2(torch.bincount(wrong, minlength=NUM), per_value)[0] > threshold


def test_approx_mixed_fallback_and_regular_positions(backend: str) -> None:
    """Fallback and regular positions side by side in one call keep their own rules."""
    regular, distinct = torch.tensor([0, 0, 0, 1, 1, 2]), torch.arange(10, 16)
    pool = torch.stack([regular, distinct] * 10_000)
    out = batch_temperature_sample(pool, 0.5, generator=torch.Generator().manual_seed(72), use_numpy=backend == "numpy")
    stat, threshold = chi2(torch.bincount(out[0::2], minlength=3), torch.tensor([0.75, 0.25, 0.0]))
    assert stat < threshold
    stat, threshold = chi2(torch.bincount(out[1::2] - 10, minlength=6), torch.full((6,), 1 / 6))
    assert stat < threshold


def test_approx_bfloat16_and_nan_pools_take_the_torch_path() -> None:
    pool = torch.tensor([[1.0, 1.0, 2.0], [float("nan"), 3.0, 3.0]])
    out = batch_temperature_sample(pool, 0.5, generator=torch.Generator().manual_seed(73))
    assert out.tolist() == [1.0, 3.0]  # NaN never equals itself: a count-1 value, never chosen at n=2
    out16 = batch_temperature_sample(pool.to(torch.bfloat16), 0.5, generator=torch.Generator().manual_seed(73))
    assert out16.dtype == torch.bfloat16 and out16.float().tolist() == [1.0, 3.0]


@pytest.mark.parametrize(("num_values", "dims"), [(512, 4), (128_256, 4), (3, 1)])
def test_known_value_range_packs_without_looking_at_the_data(num_values: int, dims: int) -> None:
    """With ``num_values`` (token ids in [0, V)) the key needs no min/max from the data (no host sync on
    GPUs); 4 ids of a 128k vocabulary do not fit one int64 and take the column-wise sort. Either way the
    counts are exact, and sampling draws the same entries as without the hint."""
    g = torch.Generator().manual_seed(80)
    rows = torch.randint(0, num_values, (5, 60, dims), generator=g)
    rows[:, ::4] = rows[:, :1]
    rows[:, 1] = num_values - 1
    key = sampling._pack_rows(rows, num_values)
    if num_values**dims > 2**63:
        assert key is None
    else:
        assert same_structure(key, rows)
    counts, perm = sampling._sorted_counts(rows, num_values)
    by_pairs = (rows[:, :, None] == rows[:, None, :]).all(-1).sum(-1)
    assert torch.equal(counts, by_pairs.gather(1, perm))
    u = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.equal(sampling._sample_torch(rows, 0.5, u, num_values), sampling._sample_torch(rows, 0.5, u))


# ------------------------------------------------------------------------------------------------
# the batch approximation on a pool compared on demand (lazy_batch_temperature_choice)
# ------------------------------------------------------------------------------------------------


class TensorPool:
    """A QueryPool over a materialised pool [P, N] or [P, N, D]; records what the sampler looked at."""

    def __init__(self, pool: torch.Tensor) -> None:
        self.pool = pool
        self.rows = pool.reshape(pool.shape[0] * pool.shape[1], -1)
        self.num_positions, self.pool_size = pool.shape[0], pool.shape[1]
        self.compared = torch.zeros(self.rows.shape[0], dtype=torch.bool)  # entries ever compared
        self.counted: list[int] = []  # positions passed to keys(), per call

    def same(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.compared[a] = True
        self.compared[b] = True
        return (self.rows[a] == self.rows[b]).all(-1)

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        self.counted.append(positions.numel())
        return self.pool[positions]


def lazy_sample(pool_row: torch.Tensor, temperature: float, positions: int, seed: int, **kw) -> tuple[torch.Tensor, TensorPool]:
    pool = TensorPool(pool_row.unsqueeze(0).expand(positions, *pool_row.shape))
    pick = sampling.lazy_batch_temperature_choice(pool, temperature, torch.Generator().manual_seed(seed), **kw)
    return pool_row[pick], pool


def value_probs(pool_row: torch.Tensor, temperature: float, num_values: int) -> torch.Tensor:
    """The rule's probability of each value 0..num_values-1 for a pool of scalar values."""
    probs = sampling._selection_probs(pool_row[None], temperature)[0]
    return torch.zeros(num_values, dtype=torch.float64).scatter_add_(0, pool_row, probs)


@pytest.mark.parametrize("tries_per_round,max_rounds", [(8, 4), (4, 1), (0, 0)])
@pytest.mark.parametrize("temperature", [0.5, 1 / 3])
def test_lazy_choice_has_the_rules_distribution(temperature: float, tries_per_round: int, max_rounds: int) -> None:
    """Tries of n entries until n distinct equal ones, then (if none succeeded) counting the whole pool: the
    drawn values follow the rule's selection probabilities, whether the tries decide most positions (4 rounds of 8),
    some of them (one round of 4: the rest counted), or none (none: counting only)."""
    pool_row = zipf(torch.Generator().manual_seed(90), (40,))  # counts 1 to 8
    probs = value_probs(pool_row, temperature, NUM)
    out, pool = lazy_sample(pool_row, temperature, 40_000, seed=91, tries_per_round=tries_per_round,
                            max_rounds=max_rounds)
    stat, threshold = chi2(torch.bincount(out, minlength=NUM), probs)
    assert stat < threshold
    counted = sum(pool.counted)
    if max_rounds == 1 and temperature == 0.5:
        assert 0.1 * 40_000 < counted < 0.9 * 40_000  # tries and counting both decide many positions
    assert (counted == 40_000) == (max_rounds == 0)
    # the same statistic rejects tuples drawn without the distinct-entries condition (weights c^n, not
    # c(c-1)...(c-n+1))
    n = round(1 / temperature)
    counts = torch.bincount(pool_row, minlength=NUM).double()
    wrong = counts**n / (counts**n).sum()
    assert chi2(torch.bincount(out, minlength=NUM), wrong)[0] > threshold


def test_lazy_choice_falls_back_like_the_rule() -> None:
    """No value repeated n times: no try can succeed, and counting applies the rule's fallback."""
    distinct = torch.randperm(200, generator=torch.Generator().manual_seed(92)) * 3
    out, pool = lazy_sample(distinct, 0.5, 40_000, seed=93)
    stat, threshold = chi2(torch.bincount(out, minlength=600)[distinct], torch.full((200,), 1 / 200))
    assert stat < threshold and sum(pool.counted) == 40_000
    assert pool.compared.view(40_000, 200).sum(1).max() <= 2 * 32  # n x tries_per_round x max_rounds, at most
    pairs = torch.tensor([0, 4, 1, 2, 0, 3, 1])  # n = 3, largest count 2: values 0 and 1 equally
    out, _ = lazy_sample(pairs, 1 / 3, 20_000, seed=94)
    assert set(out.unique().tolist()) == {0, 1}
    assert abs(float((out == 0).double().mean()) - 0.5) < 5.33 * math.sqrt(0.25 / 20_000)


def test_lazy_choice_non_integer_temperature_counts_the_pool() -> None:
    pool_row = zipf(torch.Generator().manual_seed(95), (200,))
    out, pool = lazy_sample(pool_row, 0.37, 40_000, seed=96)
    stat, threshold = chi2(torch.bincount(out, minlength=NUM), value_probs(pool_row, 0.37, NUM))
    assert stat < threshold
    assert pool.counted == [40_000] and not pool.compared.any()


def test_lazy_choice_settles_a_concentrated_pool_without_counting() -> None:
    """A pool where one chunk is 60 % of the draws is decided by the tries alone (one round of 32: the chance
    that none succeeds is 0.64^32 < 1e-6 per position); rows are compared whole (K ids)."""
    g = torch.Generator().manual_seed(97)
    rows = torch.randint(0, 50, (30, 4), generator=g)
    rows[1] = rows[0]
    rows[1, 3] += 1  # shares 3 of 4 ids with row 0
    pick = torch.where(torch.rand(500, 200, generator=g) < 0.6, 0, torch.randint(1, 30, (500, 200), generator=g))
    pool = TensorPool(rows[pick])  # [500, 200, 4]
    choice = sampling.lazy_batch_temperature_choice(pool, 0.5, torch.Generator().manual_seed(98))
    assert not pool.counted
    assert pool.compared.view(500, 200).sum(1).max() <= 2 * 32
    chosen = pick[torch.arange(500), choice]
    assert float((chosen == 0).double().mean()) > 0.9  # 0.6^2 against at most 0.4 * 0.07 for the others


def test_lazy_choice_is_reproducible_and_checks_its_options() -> None:
    pool_row = zipf(torch.Generator().manual_seed(99), (200,))
    a, _ = lazy_sample(pool_row, 0.5, 64, seed=100)
    b, _ = lazy_sample(pool_row, 0.5, 64, seed=100)
    assert torch.equal(a, b)
    out, pool = lazy_sample(pool_row, 1.0, 64, seed=100)  # T = 1: a uniform entry, nothing compared
    assert not pool.compared.any() and not pool.counted
    with pytest.raises(GenerationError, match="tries_per_round"):
        lazy_sample(pool_row, 0.5, 4, seed=0, tries_per_round=-1)
