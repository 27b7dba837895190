"""LVIS repeat-factor sampling: the factors by hand, their effect on the stream, exact resume."""

import math

import numpy as np
import pytest

from ovd.data.samplers import MultiSourceBatchSampler, TrainingBatchSampler, repeat_factors


def test_repeat_factors_match_hand_computation():
    # 10 images: category 1 in all, 2 in 5 images, 3 in one image. threshold 0.3:
    #   r(1) = max(1, sqrt(0.3 / 1.0)) = 1; r(2) = max(1, sqrt(0.3 / 0.5)) = 1; r(3) = sqrt(0.3 / 0.1) = sqrt(3)
    cats = [np.array([1]) for _ in range(4)] + [np.array([1, 2, 2]) for _ in range(5)] + [np.array([1, 3])]
    r = repeat_factors(cats, 0.3)
    assert r.dtype == np.float64
    np.testing.assert_allclose(r, [1.0] * 9 + [math.sqrt(3)])
    # threshold 2.0: r(1) = sqrt(2), r(2) = 2, r(3) = sqrt(20); an image takes its largest; empty image -> 1
    r = repeat_factors(cats + [np.zeros(0, np.int64)], 2.0)
    n = 11
    np.testing.assert_allclose(r, [math.sqrt(2 / (10 / n))] * 4 + [math.sqrt(2 / (5 / n))] * 5
                               + [math.sqrt(2 / (1 / n)), 1.0])
    with pytest.raises(ValueError, match="REPEAT_THRESHOLD"):
        repeat_factors(cats, 0.0)


def test_repeat_factor_stream_oversamples_rare_images_and_resumes_exactly():
    factors = np.ones(20)
    factors[0] = 3.5  # image 0 appears 3 or 4 times per epoch, on average 3.5
    sampler = TrainingBatchSampler(20, batch_size=4, seed=1, repeat_factors=factors)
    stream = [i for _, batch in zip(range(500), iter(sampler)) for i, _ in batch]
    counts = np.bincount(stream, minlength=20)
    # 2000 draws over epochs of 22.5 images on average: image 0 takes 3.5 / 22.5 of them
    assert counts[0] / len(stream) == pytest.approx(3.5 / 22.5, rel=0.05)
    assert counts[1:].min() > 0.5 * len(stream) / 22.5
    resumed = [b for _, b in zip(range(10), iter(TrainingBatchSampler(20, batch_size=4, seed=1,
                                                                       repeat_factors=factors, start_iter=237)))]
    full = [b for _, b in zip(range(247), iter(TrainingBatchSampler(20, batch_size=4, seed=1, repeat_factors=factors)))]
    assert resumed == full[237:]
    plain = [b for _, b in zip(range(5), iter(TrainingBatchSampler(20, batch_size=4, seed=1)))]
    assert [b for _, b in zip(range(5), iter(sampler))] != plain
    with pytest.raises(ValueError, match="one per image"):
        TrainingBatchSampler(20, batch_size=4, seed=1, repeat_factors=np.ones(19))


def test_multi_source_sampler_applies_factors_per_source():
    factors = np.ones(6)
    factors[5] = 4.0
    sampler = MultiSourceBatchSampler([6, 6], ratios=[1, 1], batch_sizes=[2, 2], seed=0,
                                      repeat_factors=[factors, None])
    drawn = {0: [], 1: []}
    for _, batch in zip(range(400), iter(sampler)):
        for k, i, _ in batch:
            drawn[k].append(i)
    c0, c1 = np.bincount(drawn[0], minlength=6), np.bincount(drawn[1], minlength=6)
    assert c0[5] > 3 * c0[:5].mean()
    assert c1.max() - c1.min() <= 2  # plain permutations: every image equally often
