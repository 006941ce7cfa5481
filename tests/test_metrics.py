"Property checks of llora.metrics: cosine matrix, normalized score, disentanglement error (Eq. 3)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from llora.metrics import cosine_similarity_matrix, normalized_score, normalized_scores, disentanglement_error


def rand_tvs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)} for i in range(n)}


def test_cosine_matrix_symmetric_unit_diagonal_and_scale_invariant():
    tvs = rand_tvs()
    m = cosine_similarity_matrix(tvs)
    assert np.allclose(m.values, m.values.T) and np.allclose(np.diag(m.values), 1)
    assert (m.values <= 1 + 1e-12).all() and (m.values >= -1 - 1e-12).all()
    scaled = {k: {kk: 3.5 * v for kk, v in tv.items()} for k, tv in tvs.items()}
    assert np.allclose(cosine_similarity_matrix(scaled).values, m.values)
    flipped = dict(tvs, t0={kk: -v for kk, v in tvs["t0"].items()})
    assert np.allclose(cosine_similarity_matrix(flipped).values[0, 1:], -m.values[0, 1:])


def test_cosine_matrix_with_task_vectors():
    TaskVector = pytest.importorskip("llora.task_vectors").TaskVector
    tvs = rand_tvs(3, seed=1)
    base = {k: torch.zeros_like(v) for k, v in tvs["t0"].items()}
    real = {name: TaskVector.between(base, tv) for name, tv in tvs.items()}
    assert np.allclose(cosine_similarity_matrix(real).values, cosine_similarity_matrix(tvs).values, atol=1e-6)


def test_normalized_score_of_single_task_models_is_one_and_scale_free():
    rng = np.random.default_rng(0)
    single = dict(zip("abcdefg", rng.uniform(0.3, 1, 7)))
    assert normalized_score(single, single) == pytest.approx(1.0)
    merged = {t: v * rng.uniform(0, 1) for t, v in single.items()}
    # the mean of per-task ratios, NaN counted as 0
    merged["c"] = float("nan")
    want = np.mean([0 if t == "c" else merged[t] / single[t] for t in single])
    assert normalized_score(merged, single) == pytest.approx(want)
    df = pd.DataFrame([merged, single])
    assert np.allclose(normalized_score(df, single).values, [want, 1.0])
    assert normalized_scores(merged, single)["c"] == 0


def test_disentanglement_error_properties():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(4, 6, generator=g)
    tv1, tv2 = {"W": torch.randn(4, 6, generator=g)}, {"W": torch.randn(4, 6, generator=g)}
    x1, x2 = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)
    pred = lambda tv, x: (x @ (W0 if tv is None else W0 + tv["W"]).T).argmax(-1)
    grid = [-1.0, 0.0, 0.5, 1.0]
    xi = disentanglement_error(pred, tv1, tv2, x1, x2, grid=grid)
    assert len(xi) == len(grid) ** 2
    assert ((xi.error >= 0) & (xi.error <= 2)).all()
    assert np.allclose(xi.error, xi.error1 + xi.error2)
    at = xi.set_index(["lambda1", "lambda2"])
    assert at.loc[(0.0, 0.0), "error"] == 0            # nothing added: identical models
    assert (at.xs(0.0, level="lambda2").error1 == 0).all()  # λ2 = 0: merged model is task 1's own model
    assert (at.xs(0.0, level="lambda1").error2 == 0).all()
    # error1 is the disagreement rate on task 1's 40 examples: a multiple of 1/40
    assert np.allclose(np.round(xi.error1 * 40), xi.error1 * 40)
    # a zero second task vector is perfectly disentangled on task 1
    zero = {"W": torch.zeros(4, 6)}
    assert (disentanglement_error(pred, tv1, zero, x1, x2, grid=grid).error1 == 0).all()
