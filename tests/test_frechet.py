"""Frechet distance, KID and precision/recall against closed forms; the shipped extractors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flowmatch.data.images import load_digits, to_model_space
from flowmatch.metrics.features import (
    ASSETS,
    FEATURE_EXTRACTORS,
    LeNet,
    LeNetConfig,
    extract_features,
    feature_extractor_record,
    load_feature_extractor,
    save_feature_extractor,
)
from flowmatch.metrics.frechet import (
    frechet_distance,
    frechet_distance_from_moments,
    image_metrics,
    kernel_inception_distance,
    precision_recall,
)


def _random_covariance(generator: torch.Generator, dim: int) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


# ---- Frechet distance --------------------------------------------------------------------


def test_frechet_from_moments_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    # commuting (diagonal) covariances: tr (C1 C2)^{1/2} = sum sqrt(d1 d2)
    d1, d2 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g) + 1
    d2 = d2.double()
    expected = (m1 - m2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum()
    fd = frechet_distance_from_moments(m1, torch.diag(d1), m2, torch.diag(d2))
    assert fd == pytest.approx(float(expected), rel=1e-12)
    # general covariances: compare with scipy's Schur-based sqrtm of the non-symmetric C1 C2
    c1, c2 = _random_covariance(g, 6), _random_covariance(g, 6)
    m1, m2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    expected = float((m1 - m2).square().sum() + c1.trace() + c2.trace()) - 2 * np.trace(cross).real
    assert frechet_distance_from_moments(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_from_moments(m2, c2, m1, c1) == pytest.approx(expected, rel=1e-10)
    # rank-deficient covariances (dead ReLU features) stay real and non-negative
    singular = c1.clone()
    singular[:, 0] = singular[0, :] = 0
    assert frechet_distance_from_moments(m1, singular, m1, singular) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(1)
    dim, n = 4, 40_000
    c1, c2 = _random_covariance(g, dim), _random_covariance(g, dim)
    m1, m2 = torch.zeros(dim, dtype=torch.float64), torch.full((dim,), 0.5, dtype=torch.float64)

    def draw(mean, cov):
        z = torch.randn(n, dim, generator=g, dtype=torch.float64)
        return mean + z @ torch.linalg.cholesky(cov).T

    a, b = draw(m1, c1), draw(m2, c2)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(a + 3.0, b + 3.0) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    exact = frechet_distance_from_moments(m1, c1, m2, c2)
    # Sample means and covariances carry relative errors of order 1/sqrt(n) = 0.5% per entry;
    # over seeds 0..3 the estimate lands within 0.5% of the exact value (~2.4 to 6.2), so 2%
    # leaves room while a wrong trace term (e.g. tr(C1 C2) for tr (C1 C2)^{1/2}) is far off.
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    with pytest.raises(ValueError, match=r"\[N >= 2, F\]"):
        frechet_distance(a[0], b)


# ---- KID ---------------------------------------------------------------------------------


def test_kid_is_unbiased_against_the_closed_form():
    # In one dimension k(x, y) = (x y + 1)^3 = x^3 y^3 + 3 x^2 y^2 + 3 x y + 1, so
    # MMD^2 = (E x^3 - E y^3)^2 + 3 (E x^2 - E y^2)^2 + 3 (E x - E y)^2.
    # x uniform on {-1, 1}: moments (0, 1, 0); y uniform on {0, 2}: (1, 2, 4) -> 16 + 3 + 3 = 22.
    g = torch.Generator().manual_seed(2)
    x = (2 * torch.randint(0, 2, (4000, 1), generator=g) - 1).double()
    y = (2 * torch.randint(0, 2, (4000, 1), generator=g)).double()
    kid = kernel_inception_distance(x, y, subset_size=10, subsets=3000, generator=g)
    assert kid.subset_size == 10 and kid.subsets == 3000
    # Subsets of 10 make a biased (V-statistic) estimator off by
    # (E k(x,x) - E k(x,x') + E k(y,y) - E k(y,y')) / m = (4 + 31) / 10 = 3.5; the unbiased mean
    # has a standard error of kid.std / sqrt(3000), and 4 of those stay below 3.5.
    standard_error = kid.std / 3000**0.5
    assert standard_error < 0.6
    assert abs(kid.mean - 22.0) < 4 * standard_error


def test_kid_is_zero_for_one_distribution():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    same = kernel_inception_distance(a, b, subset_size=200, subsets=50, generator=g)
    shifted = kernel_inception_distance(a, b + 0.5, subset_size=200, subsets=50, generator=g)
    # unbiased: the mean over 50 subsets is within 4 standard errors of 0
    assert abs(same.mean) < 4 * same.std / 50**0.5
    assert shifted.mean > 20 * same.std


# ---- precision / recall ------------------------------------------------------------------


def test_precision_recall_of_identical_sets_is_one():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(4))
    result = precision_recall(x, x.clone(), k=3)
    assert (result.precision, result.recall, result.k) == (1.0, 1.0, 3)


def test_precision_recall_on_a_grid():
    # Real points 0..99 on a line: the 3rd nearest neighbour is at distance 2 (3 at both ends),
    # so the real manifold is [-3, 102]. Generated points -10, -9.5, ..., 110 (241 points) have
    # 3-NN radius 1, cover every real point, and 211 of them (-3 .. 102) lie in the real manifold.
    real = torch.arange(100, dtype=torch.float64)[:, None]
    generated = torch.arange(-10, 110.25, 0.5, dtype=torch.float64)[:, None]
    result = precision_recall(real, generated, k=3)
    assert result.precision == pytest.approx(211 / 241, abs=1e-12)
    assert result.recall == 1.0
    # Generated points only on 0 .. 49.5 (radius 1.5 at the right end): precision 1, and the
    # real points 0 .. 51 are covered, recall 52 / 100.
    half = torch.arange(0, 50, 0.5, dtype=torch.float64)[:, None]
    result = precision_recall(real, half, k=3)
    assert (result.precision, result.recall) == (1.0, pytest.approx(0.52, abs=1e-12))


# ---- shipped feature extractors ------------------------------------------------------------


@pytest.mark.parametrize("name", FEATURE_EXTRACTORS)
def test_shipped_extractors_are_small_and_documented(name):
    weights = ASSETS / f"lenet-{name}.safetensors"
    assert weights.stat().st_size < 1_000_000
    record = feature_extractor_record(name)
    assert {"test_accuracy", "seed", "epochs", "command"} <= set(record)
    model = load_feature_extractor(name)
    size = record["config"]["image_size"]
    assert model.name == f"lenet-{name}" and not model.training
    features = model(torch.zeros(2, 1, size, size))
    assert features.shape == (2, record["config"]["feature_dim"]) and bool((features >= 0).all())


def test_digits_extractor_reproduces_its_recorded_accuracy():
    model = load_feature_extractor("digits")
    test = load_digits("test")
    with torch.inference_mode():
        predicted = model.classify(to_model_space(test.images, test.levels)).argmax(-1)
    accuracy = (predicted == test.labels).double().mean().item()
    # the same weights and inputs; only summation order could move a borderline logit
    assert accuracy == pytest.approx(feature_extractor_record("digits")["test_accuracy"], abs=0.01)
    assert accuracy > 0.9


def test_extractor_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LeNet(LeNetConfig(name="digits", levels=17, image_size=8, channels=(4, 8)))
    save_feature_extractor(model, tmp_path, {"test_accuracy": 0.0})
    loaded = load_feature_extractor("digits", tmp_path)
    assert loaded.config == model.config
    assert json.loads((tmp_path / "lenet-digits.json").read_text())["config"]["levels"] == 17
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(loaded(x), model.eval()(x))


def test_image_metrics_with_the_digits_extractor():
    extractor = load_feature_extractor("digits")
    train, test = load_digits("train"), load_digits("test")
    # uint8 images go in at their cell centres, the same as the float model-space input
    features = extract_features(extractor, test.images)
    torch.testing.assert_close(
        features, extract_features(extractor, to_model_space(test.images, test.levels))
    )
    same = image_metrics(test.images, test.images, extractor, kid_subset_size=100, kid_subsets=10)
    assert same.extractor == "lenet-digits" and same.num_samples == 297
    # Zero up to round-off, which the square roots amplify: an eigenvalue that is 0 in exact
    # arithmetic comes out ~eps * lambda_max, its root ~sqrt(eps * lambda_max), and there are at
    # most d of them (here ~3e-5; the value seen is 1e-7 to 1e-6, depending on BLAS threads).
    lambda_max = float(torch.linalg.eigvalsh(torch.cov(features.T)).max())
    round_off = features.shape[1] * math.sqrt(torch.finfo(torch.float64).eps * lambda_max)
    assert same.frechet_distance == pytest.approx(0, abs=round_off)
    assert (same.precision, same.recall) == (1.0, 1.0)
    g = torch.Generator().manual_seed(5)
    held_out = image_metrics(train.images, test.images, extractor, 100, 10, generator=g)
    noise = torch.rand(297, 1, 8, 8, generator=g) * 2 - 1
    bad = image_metrics(noise, test.images, extractor, 100, 10, generator=g)
    assert bad.frechet_distance > 5 * held_out.frechet_distance
    assert bad.kid > 5 * held_out.kid and bad.precision < held_out.precision
    with pytest.raises(ValueError, match="lenet-digits takes images of shape"):
        extract_features(extractor, torch.zeros(2, 1, 28, 28))
