"""The merge methods against hand-worked numbers from their papers' definitions, and their registration.

Notation: ``theta_m`` the models' tensors, ``base`` the base's, ``tau_m = theta_m - base`` the task vectors,
``w_m`` the weights.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.errors import PolmError
from polm.engine.plugins import registry
from polm.plugins.integration.merge.methods import (
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from polm.plugins.integration.merge.methods.sparsify import magnitude_keep_probability


def vector(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The TIES example, worked by hand below: three task vectors of five entries on a base of ones. The values
# are dyadic, so base + tau - base is exact in float32 and the tie in entry 3 is a true tie.
BASE = vector(1.0, 1.0, 1.0, 1.0, 1.0)
TAUS = [
    vector(0.5, -0.25, 0.0, 0.375, -0.125),
    vector(-0.375, 0.75, 0.125, -0.375, 0.25),
    vector(0.125, -0.625, 0.0, 0.0625, -0.75),
]
MODELS = [BASE + tau for tau in TAUS]


# -- linear and task arithmetic ---------------------------------------------------------------------------


def test_linear_normalises_the_weights():
    """a = [1, 2, 3, 4], b = [5, 6, 7, 8], w = [1, 3].

    normalize (default): (1 a + 3 b) / 4 = [16, 20, 24, 28] / 4 = [4, 5, 6, 7].
    normalize false: 1 a + 3 b = [16, 20, 24, 28]. Weights summing to 0 cannot be normalised.
    """
    a, b = vector(1, 2, 3, 4), vector(5, 6, 7, 8)
    assert_close(linear([a, b], None, weight=[1.0, 3.0]), vector(4, 5, 6, 7))
    assert_close(linear([a, b], None, weight=[1.0, 3.0], normalize=False), vector(16, 20, 24, 28))
    with pytest.raises(ValueError, match="sum to 0"):
        linear([a, b], None, weight=[1.0, -1.0])


def test_task_arithmetic_scales_the_weighted_task_vectors_by_lambda():
    """base = [1, 2, 3], tau_1 = [1, 0, -1], tau_2 = [0, 2, 2], w = [0.5, 0.25], lambda = 2.

    sum w tau = [0.5, 0, -0.5] + [0, 0.5, 0.5] = [0.5, 0.5, 0]; base + 2 * that = [2, 3, 3].
    normalize: divide the sum by 0.75 first: base + 2 * [2/3, 2/3, 0] = [7/3, 10/3, 3].
    """
    base = vector(1, 2, 3)
    models = [base + vector(1, 0, -1), base + vector(0, 2, 2)]
    assert_close(task_arithmetic(models, base, weight=[0.5, 0.25], lambda_=2.0), vector(2, 3, 3))
    assert_close(
        task_arithmetic(models, base, weight=[0.5, 0.25], lambda_=2.0, normalize=True), vector(7 / 3, 10 / 3, 3)
    )
    assert_close(task_arithmetic(models, base, weight=[0.5, 0.25]), vector(1.5, 2.5, 3))


# -- TIES -------------------------------------------------------------------------------------------------


def test_ties_trims_elects_and_merges_disjointly():
    """density 0.6 keeps k = int(0.6 * 5) = 3 entries of each task vector, the largest in magnitude:

        tau_1 = [ 0.5,   -0.25,  0,     0.375,  -0.125] -> [ 0.5,   -0.25,  0,  0.375, 0    ]
        tau_2 = [-0.375,  0.75,  0.125, -0.375,  0.25 ] -> [-0.375,  0.75,  0, -0.375, 0    ]
        tau_3 = [ 0.125, -0.625, 0,     0.0625, -0.75 ] -> [ 0.125, -0.625, 0,  0,    -0.75 ]

    Elected sign = sign of the column sums [0.25, -0.125, 0, 0 (a tie), -0.75] -> [+, -, +, +, -]
    (a sum of 0 elects +). Disjoint mean of the nonzero entries with that sign:
        entry 0: (0.5 + 0.125) / 2 = 0.3125      entry 1: (-0.25 - 0.625) / 2 = -0.4375
        entry 2: every entry trimmed -> no model agrees -> 0 (the base stays)
        entry 3: the tie elects +, only tau_1 agrees -> 0.375      entry 4: -0.75
    """
    merged = ties(MODELS, BASE, weight=[1.0, 1.0, 1.0], density=[0.6, 0.6, 0.6])
    assert_close(merged, BASE + vector(0.3125, -0.4375, 0.0, 0.375, -0.75))


def test_ties_elects_with_the_weights_and_averages_by_them():
    """The trimmed task vectors above with w = [1, 2, 1]: w tau' =

        [0.5, -0.25, 0, 0.375, 0], [-0.75, 1.5, 0, -0.75, 0], [0.125, -0.625, 0, 0, -0.75]

    Column sums [-0.125, 0.625, 0, -0.375, -0.75] elect [-, +, +, -, -]; only tau_2 agrees on entries 0, 1
    and 3, only tau_3 on entry 4, so the weighted disjoint mean is [-0.75/2, 1.5/2, 0, -0.75/2, -0.75/1] =
    [-0.375, 0.75, 0, -0.375, -0.75]. Without normalize the agreeing entries are summed:
    [-0.75, 1.5, 0, -0.75, -0.75], and lambda = 0.5 halves that.
    """
    weight, density = [1.0, 2.0, 1.0], [0.6, 0.6, 0.6]
    assert_close(ties(MODELS, BASE, weight=weight, density=density), BASE + vector(-0.375, 0.75, 0, -0.375, -0.75))
    unnormalized = ties(MODELS, BASE, weight=weight, density=density, normalize=False, lambda_=0.5)
    assert_close(unnormalized, BASE + 0.5 * vector(-0.75, 1.5, 0.0, -0.75, -0.75))


def test_ties_trim_alone_and_its_rescale():
    """One model: the sign election keeps every nonzero entry, so the result is base + trimmed tau_1.

    tau_1 at density 0.6 -> [0.5, -0.25, 0, 0.375, 0], L1 norm 1.125 (from 1.25); rescale multiplies by
    1.25 / 1.125 = 10/9. Of equal magnitudes the earlier entry is kept: [0.25, -0.5, 0.25, 0.25] at density
    0.5 keeps -0.5 and the first 0.25. Density 0.1 keeps int(0.5) = 0 entries: refused, as in mergekit.
    """
    assert_close(ties(MODELS[:1], BASE, weight=[1.0], density=[0.6]), BASE + vector(0.5, -0.25, 0, 0.375, 0))
    rescaled = ties(MODELS[:1], BASE, weight=[1.0], density=[0.6], rescale=True)
    assert_close(rescaled, BASE + vector(0.5, -0.25, 0, 0.375, 0) * 10 / 9)
    tied = ties([vector(0.25, -0.5, 0.25, 0.25)], torch.zeros(4), weight=[1.0], density=[0.5])
    assert_close(tied, vector(0.25, -0.5, 0, 0))
    with pytest.raises(ValueError, match="keeps no entry"):
        ties(MODELS[:1], BASE, weight=[1.0], density=[0.1])


# -- DARE -------------------------------------------------------------------------------------------------

DARE_BASE = vector(0.0, 1.0, -1.0, 2.0, 0.5, -0.5)
DARE_TAUS = [vector(0.4, -0.8, 0.2, 0.0, 1.0, -0.6), vector(-0.2, 0.6, 0.4, 1.0, -0.4, 0.2)]


def test_dare_linear_keeps_the_expected_value():
    """Each entry becomes ``w_m tau_m B_m / q_m`` with ``B_m ~ Bernoulli(q_m)``, q = density = [0.5, 0.25].

    E[tau B / q] = tau, so the mean over seeds tends to the undropped ``base + sum_m w_m tau_m``, and one
    draw has variance ``sum_m w_m^2 tau_m^2 (1 - q_m) / q_m``. The mean of K = 4000 independent draws has
    standard deviation sqrt(variance / K); each entry must lie within 5 of those (a chance of about 6e-7
    per entry to fail by bad luck; without the 1/q rescale the mean is off by over 20 of them).
    """
    weight, density = [1.0, 0.5], [0.5, 0.25]
    models = [DARE_BASE + tau for tau in DARE_TAUS]
    draws = 4000
    mean = sum(
        dare_linear(models, DARE_BASE, weight=weight, density=density, generator=seeded(seed))
        for seed in range(draws)
    ) / draws
    expected = DARE_BASE + sum(w * tau for w, tau in zip(weight, DARE_TAUS))
    variance = sum(w**2 * tau**2 * (1 - q) / q for w, tau, q in zip(weight, DARE_TAUS, density))
    z_scores = (mean - expected) / (variance / draws).sqrt()
    assert_close(z_scores, torch.zeros_like(z_scores), atol=5.0, rtol=0.0)


def test_dare_is_reproducible_with_its_seed():
    """The same seed gives the same tensor; another seed another (64 entries at density 0.5: the two masks
    coincide with probability 2^-64)."""
    base = torch.zeros(8, 8)
    models = [base + torch.linspace(-1, 1, 64).reshape(8, 8)]
    for method in (dare_linear, dare_ties):
        first = method(models, base, weight=[1.0], density=[0.5], generator=seeded(3))
        again = method(models, base, weight=[1.0], density=[0.5], generator=seeded(3))
        other = method(models, base, weight=[1.0], density=[0.5], generator=seeded(4))
        assert torch.equal(first, again), method.__name__
        assert not torch.equal(first, other), method.__name__


def test_dare_ties_elects_signs_after_the_drop():
    """density 1 drops nothing, so dare_ties is TIES without the trim. Untrimmed column sums of the TIES
    example, [0.25, -0.125, 0.125, 0.0625, -0.625], elect [+, -, +, +, -]; the agreeing entries sum
    (dare_ties does not normalize by default) to [0.5 + 0.125, -0.25 - 0.625, 0.125, 0.375 + 0.0625,
    -0.125 - 0.75] = [0.625, -0.875, 0.125, 0.4375, -0.875], or with normalize their means
    [0.3125, -0.4375, 0.125, 0.21875, -0.4375].

    density 0 for tau_2 and tau_3 drops them whole: only tau_1 is left, and every entry of it agrees.
    """
    ones = [1.0, 1.0, 1.0]
    dense = dare_ties(MODELS, BASE, weight=ones, density=ones, generator=seeded(0))
    assert_close(dense, BASE + vector(0.625, -0.875, 0.125, 0.4375, -0.875))
    normalized = dare_ties(MODELS, BASE, weight=ones, density=ones, normalize=True, generator=seeded(0))
    assert_close(normalized, BASE + vector(0.3125, -0.4375, 0.125, 0.21875, -0.4375))
    alone = dare_ties(MODELS, BASE, weight=ones, density=[1.0, 0.0, 0.0], generator=seeded(0))
    assert_close(alone, BASE + TAUS[0])


# -- DELLA ------------------------------------------------------------------------------------------------

DELLA_TAU = torch.tensor([[0.1, -0.4, 0.2, 0.3], [0.8, 0.05, -0.5, 0.6]])
# Ranks by magnitude within each row: [0, 3, 1, 2] and [3, 0, 1, 2]; q = (0.5 - 0.15) + 0.3 * rank / 3.
DELLA_KEEP = torch.tensor([[0.35, 0.65, 0.45, 0.55], [0.65, 0.35, 0.45, 0.55]])


def test_della_keep_probabilities_follow_the_magnitude_ranks():
    """density 0.5, epsilon 0.15: each row's smallest magnitude is kept with 0.35, its largest with 0.65,
    the ones between at equal steps (their drop probabilities 1 - q span [p - epsilon, p + epsilon] with
    p = 0.5). On a random row, sorting by magnitude sorts the probabilities; density 1 keeps everything;
    density +- epsilon must stay inside (0, 1)."""
    assert_close(magnitude_keep_probability(DELLA_TAU[None], [0.5], [0.15])[0], DELLA_KEEP)
    row = torch.randn(1, 10, generator=seeded(0))
    keep = magnitude_keep_probability(row, [0.4], [0.1])[0]
    assert torch.equal(torch.argsort(row[0].abs()), torch.argsort(keep))
    assert_close(keep.min(), torch.tensor(0.3))
    assert_close(keep.max(), torch.tensor(0.5))
    assert torch.equal(magnitude_keep_probability(row, [1.0], [0.15]), torch.ones_like(row))
    with pytest.raises(ValueError, match="inside"):
        magnitude_keep_probability(row, [0.9], [0.15])


def test_della_linear_keeps_the_expected_value():
    """As for DARE, with each entry's own q from the table above: the mean of K = 4000 draws lies within
    5 standard deviations sqrt(tau^2 (1 - q) / (q K)) of base + tau."""
    base = torch.ones(2, 4)
    draws = 4000
    mean = sum(
        della_linear([base + DELLA_TAU], base, weight=[1.0], density=[0.5], epsilon=[0.15], generator=seeded(seed))
        for seed in range(draws)
    ) / draws
    variance = DELLA_TAU**2 * (1 - DELLA_KEEP) / DELLA_KEEP
    z_scores = (mean - (base + DELLA_TAU)) / (variance / draws).sqrt()
    assert_close(z_scores, torch.zeros_like(z_scores), atol=5.0, rtol=0.0)


def test_della_without_a_drop_is_ties_without_the_trim():
    """density 1 keeps every entry, so della (normalize on by default) gives the means worked out for
    dare_ties above: [0.3125, -0.4375, 0.125, 0.21875, -0.4375]."""
    ones = [1.0, 1.0, 1.0]
    merged = della(MODELS, BASE, weight=ones, density=ones, epsilon=[0.15] * 3, generator=seeded(0))
    assert_close(merged, BASE + vector(0.3125, -0.4375, 0.125, 0.21875, -0.4375))


# -- slerp ------------------------------------------------------------------------------------------------


def test_slerp_returns_its_endpoints():
    base, model = torch.randn(3, 4, generator=seeded(1)), torch.randn(3, 4, generator=seeded(2))
    assert_close(slerp([model], base, t=0.0), base)
    assert_close(slerp([model], base, t=1.0), model)


def test_slerp_keeps_unit_norm_and_splits_the_angle():
    """e1 and e2 are orthogonal unit vectors (Omega = pi/2): slerp at t is [cos(t pi/2), sin(t pi/2)],
    of norm 1, at angle t pi/2 from e1 and (1 - t) pi/2 from e2; t = 0.5 gives (e1 + e2) / sqrt(2), where
    lerp would give norm 1/sqrt(2).

    Non-unit: base [1, 0], model [1, 1] (Omega = pi/4) at t = 0.5: sin(pi/8) / sin(pi/4) * ([1, 0] + [1, 1]).
    """
    e1, e2 = vector(1, 0), vector(0, 1)
    half = slerp([e2], e1, t=0.5)
    assert_close(half, vector(1, 1) / math.sqrt(2))
    assert_close(half.norm(), torch.tensor(1.0))
    assert_close(torch.dot(half, e1), torch.dot(half, e2))
    assert_close(slerp([e2], e1, t=0.25), vector(math.cos(math.pi / 8), math.sin(math.pi / 8)))
    scale = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    assert_close(slerp([vector(1, 1)], vector(1, 0), t=0.5), scale * vector(2, 1))


def test_slerp_falls_back_to_lerp_for_parallel_inputs():
    """v and 2v (cos 1): (1 - t) v + t 2v = 1.3 v at t = 0.3. v and -v (cos -1): (1 - 2t) v, 0 at t = 0.5.
    slerp takes exactly one model besides the base."""
    v = vector(1, -2, 3)
    assert_close(slerp([2 * v], v, t=0.3), 1.3 * v)
    assert_close(slerp([-v], v, t=0.5), torch.zeros(3))
    assert_close(slerp([-v], v, t=0.25), 0.5 * v)
    with pytest.raises(ValueError, match="exactly 1"):
        slerp([v, v], v, t=0.5)


# -- model stock ------------------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_angle():
    """Two task vectors 60 degrees apart, [1, 0] and [1/2, sqrt(3)/2]: cos = 1/2, N = 2,
    t = N cos / (1 + (N - 1) cos) = 1 / 1.5 = 2/3; the result is base + t * mean(tau) =
    base + 2/3 * [3/4, sqrt(3)/4] = base + [1/2, sqrt(3)/6].

    Three: e1, e2, (e1 + e2)/sqrt(2): pairwise cosines 0, 1/sqrt(2), 1/sqrt(2), mean c = sqrt(2)/3,
    t = 3c / (1 + 2c).
    """
    base = vector(0.5, 0.5)
    taus = [vector(1, 0), vector(0.5, math.sqrt(3) / 2)]
    merged = model_stock([base + tau for tau in taus], base)
    assert_close(merged, base + vector(0.5, math.sqrt(3) / 6))
    c = math.sqrt(2) / 3
    taus = [vector(1, 0), vector(0, 1), vector(1, 1) / math.sqrt(2)]
    mean_tau = sum(taus) / 3
    assert_close(model_stock([base + tau for tau in taus], base), base + 3 * c / (1 + 2 * c) * mean_tau)
    with pytest.raises(ValueError, match="at least 2"):
        model_stock([base + taus[0]], base)


def test_model_stock_filter_wise_gives_each_row_its_ratio():
    """Base 0, rows of tau_1 = [[1, 0], [1, 0]] and tau_2 = [[2, 0], [0, 1]]: row 0 parallel (cos 1,
    t = 1, the mean [1.5, 0]), row 1 orthogonal (cos 0, t = 0, the base). Whole tensor: cos = 2 / sqrt(2 * 5),
    t = 2c / (1 + c), applied to the mean [[1.5, 0], [0.5, 0.5]]."""
    base = torch.zeros(2, 2)
    models = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
    assert_close(model_stock(models, base, filter_wise=True), torch.tensor([[1.5, 0.0], [0.0, 0.0]]))
    c = 2 / math.sqrt(10)
    assert_close(model_stock(models, base), 2 * c / (1 + c) * torch.tensor([[1.5, 0.0], [0.5, 0.5]]))


# -- dtype and shape, every method --------------------------------------------------------------------------

CALLS = {
    "linear": lambda ms, b: linear(ms, None, weight=[0.3, 0.7]),
    "task_arithmetic": lambda ms, b: task_arithmetic(ms, b, weight=[0.3, 0.7], lambda_=0.9),
    "ties": lambda ms, b: ties(ms, b, weight=[0.3, 0.7], density=[0.5, 0.5]),
    "dare_linear": lambda ms, b: dare_linear(ms, b, weight=[0.3, 0.7], density=[0.5, 0.7], generator=seeded(0)),
    "dare_ties": lambda ms, b: dare_ties(ms, b, weight=[0.3, 0.7], density=[0.5, 0.7], generator=seeded(0)),
    "della": lambda ms, b: della(ms, b, weight=[0.3, 0.7], density=[0.5] * 2, epsilon=[0.1] * 2, generator=seeded(0)),
    "della_linear": lambda ms, b: della_linear(
        ms, b, weight=[0.3, 0.7], density=[0.5] * 2, epsilon=[0.1] * 2, generator=seeded(0)
    ),
    "slerp": lambda ms, b: slerp(ms[:1], b, t=0.3),
    "model_stock": lambda ms, b: model_stock(ms, b),
}


@pytest.mark.parametrize("shape", [(3, 4), (5,)], ids=["2d", "1d"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_dtype_and_shape_are_kept_and_the_work_is_float32(name, shape):
    """bf16 in, bf16 out of the same shape, equal to the float32 result of the same inputs rounded once
    (so nothing is rounded to bf16 along the way)."""
    base = torch.randn(shape, generator=seeded(5)).to(torch.bfloat16)
    models = [(base.float() + torch.randn(shape, generator=seeded(6 + m))).to(torch.bfloat16) for m in range(2)]
    merged = CALLS[name](models, base)
    assert merged.dtype == torch.bfloat16 and merged.shape == base.shape
    reference = CALLS[name]([m.float() for m in models], base.float())
    assert reference.dtype == torch.float32
    assert torch.equal(merged, reference.to(torch.bfloat16))


# -- registration -------------------------------------------------------------------------------------------

FUNCTIONS = {f.__name__: f for f in (linear, task_arithmetic, ties, dare_linear, dare_ties, della, della_linear,
                                    slerp, model_stock)}
LAMBDA = {"aliases": {"lambda": "lambda_"}}
WEIGHT_DENSITY = {"weight": 1.0, "density": 1.0}
# name: (registration metadata without the description, the method parameters with mergekit's defaults).
EXPECTED = {
    "linear": ({"base": "unused", "model_parameters": {"weight": 1.0}}, {"normalize": True}),
    "task_arithmetic": (
        {"base": "required", "model_parameters": {"weight": 1.0}, **LAMBDA},
        {"normalize": False, "lambda_": 1.0, "int8_mask": False},
    ),
    "ties": (
        {"base": "required", "model_parameters": WEIGHT_DENSITY, **LAMBDA},
        {"normalize": True, "rescale": False, "lambda_": 1.0, "int8_mask": False},
    ),
    "dare_linear": (
        {"base": "required", "model_parameters": WEIGHT_DENSITY, **LAMBDA},
        {"normalize": False, "rescale": True, "lambda_": 1.0, "int8_mask": False, "generator": None},
    ),
    "dare_ties": (
        {"base": "required", "model_parameters": WEIGHT_DENSITY, **LAMBDA},
        {"normalize": False, "rescale": True, "lambda_": 1.0, "int8_mask": False, "generator": None},
    ),
    "della": (
        {"base": "required", "model_parameters": {**WEIGHT_DENSITY, "epsilon": 0.15}, **LAMBDA},
        {"normalize": True, "rescale": True, "lambda_": 1.0, "int8_mask": False, "generator": None},
    ),
    "della_linear": (
        {"base": "required", "model_parameters": {**WEIGHT_DENSITY, "epsilon": 0.15}, **LAMBDA},
        {"normalize": False, "rescale": True, "lambda_": 1.0, "int8_mask": False, "generator": None},
    ),
    "slerp": ({"base": "required", "models": 1, "model_parameters": {}}, {"t": inspect.Parameter.empty}),
    "model_stock": ({"base": "required", "model_parameters": {}}, {"filter_wise": False}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_method_is_registered_with_its_metadata(name):
    """Through the plugin manager, as users get it: the function, its metadata, and a signature whose
    keyword-only parameters are the per-model ones (required: their defaults are the metadata's) plus the
    method's own with mergekit's defaults; every alias names one of them."""
    assert polm.components("merge_methods")[name] is FUNCTIONS[name]
    entry = registry("merge_methods").entry(name)
    assert entry.plugin == "polm.plugins.integration"
    metadata = dict(entry.metadata)
    description = metadata.pop("description")
    assert isinstance(description, str) and description and "\n" not in description
    expected_metadata, method_parameters = EXPECTED[name]
    assert metadata == expected_metadata
    parameters = inspect.signature(entry.obj).parameters
    assert list(parameters)[:2] == ["tensors", "base"]
    keyword_only = {n: p.default for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    per_model = {n: inspect.Parameter.empty for n in metadata["model_parameters"]}
    assert keyword_only == {**per_model, **method_parameters}
    for keyword in metadata.get("aliases", {}).values():
        assert keyword in keyword_only


def test_an_unknown_method_is_answered_with_the_available_ones():
    with pytest.raises(PolmError, match="Did you mean 'ties'") as error:
        registry("merge_methods").get("tie")
    assert "Available: " + ", ".join(sorted(EXPECTED)) in str(error.value)
