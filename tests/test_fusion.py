"Property and regression checks of llora.fusion: streamed exact thresholds, TIES vs dense/peft, LoraHub, errors."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

import numpy as np
import pytest
import torch

import llora.fusion as F
from llora.fusion import (HPARAM_GRIDS, METHODS, dense_ties_reference, fuse, keep_count, kth_largest_magnitude,
                          merge, register_method)
from llora.task_vectors import KeyMismatchError, TaskVector

SHAPES = {"blocks.0.attn.w": (64, 48), "blocks.0.attn.b": (64,), "blocks.1.mlp.w": (96, 64), "head.w": (10, 96),
          "scalar": (1,)}


def rand_tvs(n, seed=0, dtype=torch.float32, shapes=SHAPES, same_sign=False):
    g = torch.Generator().manual_seed(seed)
    sign = {k: torch.randn(s, generator=g).sign() for k, s in shapes.items()}
    out = []
    for i in range(n):
        d = {k: torch.randn(s, generator=g, dtype=torch.float64) * (1 + i) for k, s in shapes.items()}
        if same_sign: d = {k: v.abs() * sign[k].double() for k, v in d.items()}
        out.append(TaskVector({k: v.to(dtype) for k, v in d.items()}))
    return out


@pytest.fixture
def streamed(monkeypatch):
    "Force the radix-select path even for small vectors."
    monkeypatch.setattr(F, "DENSE_KTH_MAX", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kth_largest_magnitude_exact(dtype, streamed):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g).to(dtype) for s in [(300, 7), (5,), (1,), (40, 3, 2)]]
    ts.append(torch.randint(-3, 4, (200,), generator=g).to(dtype))  # heavy ties and zeros
    flat = torch.cat([t.double().reshape(-1) for t in ts]).abs()
    n = flat.numel()
    for m in [1, 2, 10, 150, 200, n // 2, n - 150, n - 1, n]:
        assert kth_largest_magnitude(ts, m) == float(flat.kthvalue(n - m + 1).values)


def test_keep_count_rules():
    assert [keep_count(1000, k) for k in (0.25, 0.5, 0.75, 1.0)] == [250, 500, 750, 1000]
    assert [keep_count(1000, k, "authors") for k in (0.25, 0.5, 0.75, 1.0)] == [251, 501, 751, 1000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rule", ["topk", "authors"])
def test_global_ties_equals_dense_reference(dtype, rule, streamed):
    tvs = rand_tvs(5, seed=1, dtype=dtype)
    for k, lam in ((0.05, 1.0), (0.25, 0.5), (0.75, 1.0), (1.0, 0.25)):
        s = fuse("ties", tvs, k=k, scaling=lam, trim_rule=rule)
        d = dense_ties_reference(tvs, k=k, scaling=lam, trim_rule=rule)
        assert s.allclose(d, rtol=0, atol=1e-6), (k, lam)
        # the trim keeps the same entries: identical sparsity pattern
        assert all(torch.equal(s[key] != 0, d[key] != 0) for key in s)


def test_global_ties_streams_large_tensors_and_chunks(monkeypatch):
    "Tensors above the chunk size go through one by one, small ones batched: both paths against the dense reference."
    monkeypatch.setattr(F, "DENSE_KTH_MAX", 0)
    monkeypatch.setattr(F, "_CHUNK", 1000)
    monkeypatch.setattr(F, "_SLICE", 777)  # merge large tensors in slices (with a ragged last slice)
    tvs = rand_tvs(3, seed=8)  # tensors of 3072, 64, 6144, 960 and 1 entries
    assert fuse("ties", tvs, k=0.2).allclose(dense_ties_reference(tvs, k=0.2), rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="keeps no entry of 1 tensor"):  # the 1-entry 'scalar'
        assert fuse("ties", tvs, k=0.2, scope="per_tensor").allclose(fuse("ties", tvs, k=0.2, scope="per_tensor"))
    assert fuse("simple_average", tvs).allclose(merge(tvs, combine="disjoint_mean"), atol=1e-6)  # no zeros here
    monkeypatch.setattr(F, "_SLICE", 2)  # exact sign ties patched at the right offsets
    ints = [TaskVector({"x": torch.tensor([1., -1., 2., 0., 5.]), "y": torch.tensor([2., -2.])}),
            TaskVector({"x": torch.tensor([-1., 1., -3., 1., 5.]), "y": torch.tensor([-2., -1.])})]
    for flip in (1, -1):
        v = [flip * t for t in ints]
        assert fuse("ties", v, k=1.0) == dense_ties_reference(v, k=1.0)


def test_global_ties_mixed_dtypes(streamed):
    tvs = rand_tvs(3, seed=2)
    tvs = [TaskVector({**tv, "head.w": tv["head.w"].double()}) for tv in tvs]
    assert fuse("ties", tvs, k=0.3).allclose(dense_ties_reference(tvs, k=0.3), rtol=0, atol=1e-6)


def test_exact_sign_ties_follow_the_authors_majority_rule():
    tvs = [TaskVector({"x": torch.tensor([1., -1., 2., 0., 5.]), "y": torch.tensor([2., -2.])}),
           TaskVector({"x": torch.tensor([-1., 1., -3., 1., 5.]), "y": torch.tensor([-2., -1.])})]
    for sign_tie in ("majority", "positive"):
        for flip in (1, -1):
            v = [flip * t for t in tvs]
            assert fuse("ties", v, k=1.0, sign_tie=sign_tie) == dense_ties_reference(v, k=1.0, sign_tie=sign_tie)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.75])
def test_per_tensor_ties_matches_peft(n, density):
    from peft.utils.merge_utils import ties as peft_ties
    shapes = {k: s for k, s in SHAPES.items() if k != "scalar"}  # peft's topk on 1 entry keeps 0 at k<1; ours too
    tvs = rand_tvs(n, seed=3, shapes=shapes)
    for w in (1.0, 0.4):
        ours = fuse("ties", tvs, k=density, scope="per_tensor", weights=[w] * n)
        for key in shapes:
            ref = peft_ties([tv[key] for tv in tvs], torch.full((n,), w), density=density)
            assert torch.allclose(ours[key], ref, atol=1e-6), key


def test_per_tensor_tiny_tensor_trimmed_like_peft():
    from peft.utils.merge_utils import ties as peft_ties
    tvs = rand_tvs(2, seed=4, shapes={"s": (1,), "t": (3,)})
    with pytest.warns(UserWarning, match=r"keeps no entry of 2 tensor\(s\) \('s', 't'\)"):
        ours = fuse("ties", tvs, k=0.25, scope="per_tensor")
    for key in ("s", "t"): assert torch.equal(ours[key], peft_ties([tv[key] for tv in tvs], torch.ones(2), 0.25))


def test_task_arithmetic_single_vector_returns_finetuned():
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randint(-256, 256, s, generator=g) / 128 for k, s in SHAPES.items()}
    ft = {k: v + torch.randint(-256, 256, v.shape, generator=g) / 4096 for k, v in base.items()}
    tau = TaskVector.between(base, ft)
    merged = fuse("task_arithmetic", [tau], scaling=1.0).apply_to(base)
    assert all(torch.equal(merged[k], ft[k]) for k in ft)
    rb, rf = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}, {}
    rf = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in rb.items()}
    merged = fuse("task_arithmetic", [TaskVector.between(rb, rf)], scaling=1.0).apply_to(rb)
    assert all(torch.allclose(merged[k], rf[k], rtol=2 * torch.finfo(torch.float32).eps, atol=0) for k in rf)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_k1_agreeing_signs_is_scaled_average(scope):
    tvs = rand_tvs(4, seed=5, same_sign=True)
    avg = fuse("simple_average", tvs)
    for lam in (0.0, 0.25, 1.0):
        assert fuse("ties", tvs, k=1.0, scaling=lam, scope=scope).allclose(lam * avg, atol=1e-6)


def test_simple_average_and_task_arithmetic():
    tvs = rand_tvs(3, seed=6)
    assert fuse("simple_average", tvs).allclose((tvs[0] + tvs[1] + tvs[2]) / 3, atol=1e-6)
    assert fuse("task_arithmetic", tvs, scaling=0.4).allclose(0.4 * sum(tvs), atol=1e-6)
    assert fuse("task_arithmetic", tvs, scaling=0.0).norm() == 0


def test_merge_preserves_dtype_and_accumulates_half_in_float32():
    tvs = [TaskVector({"w": torch.full((4,), 40000.0, dtype=torch.float16)}) for _ in range(3)]
    out = fuse("simple_average", tvs)  # the fp16 sum would overflow (120000 > 65504)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], tvs[0]["w"])


def test_merge_dict_inputs_are_converted():
    tvs = rand_tvs(2, seed=7)
    assert fuse("task_arithmetic", [dict(tv) for tv in tvs], scaling=1.0) == fuse("task_arithmetic", tvs, scaling=1.0)


def _quad_problem(n, seed=0):
    tvs = rand_tvs(n, seed=seed, shapes={"w": (12, 5), "b": (5,)})
    w_star = np.linspace(-0.9, 1.1, n)
    target = merge(tvs, weights=w_star)
    def loss(m): return sum(float(((m[k] - target[k]) ** 2).sum()) for k in m)
    return tvs, w_star, loss


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_lorahub_finds_quadratic_optimum_at_paper_budget(n):
    tvs, w_star, loss = _quad_problem(n)
    merged, w = fuse("lorahub", tvs, loss_fn=loss, alpha=0.0)
    assert w.shape == (n,) and merged.allclose(merge(tvs, weights=w))
    if n <= 3: assert np.abs(w - w_star).max() < 0.1  # 40 evaluations pin down 2-3 weights
    assert loss(merged) < 0.05 * loss(merge(tvs, weights=np.zeros(n)))  # and cut the loss by > 95% up to 7


@pytest.mark.parametrize("n,budget", [(1, 150), (2, 200), (3, 400)])
def test_lorahub_large_budgets_do_not_crash(n, budget):
    "NGOpt would pick a metamodel that crashes with NumPy 2; lorahub warns and falls back."
    tvs, w_star, loss = _quad_problem(n, seed=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, w = fuse("lorahub", tvs, loss_fn=loss, alpha=0.0, budget=budget)
    assert any("MetaModel" in str(r.message) for r in rec)
    assert np.abs(w - w_star).max() < 0.05


def test_lorahub_seed_and_penalty():
    tvs, w_star, loss = _quad_problem(3)
    _, w1 = fuse("lorahub", tvs, loss_fn=loss, seed=3)
    _, w2 = fuse("lorahub", tvs, loss_fn=loss, seed=3)
    assert np.array_equal(w1, w2)
    _, w_big = fuse("lorahub", tvs, loss_fn=lambda m: 0.0, alpha=1.0)  # only the penalty: weights stay near 0
    assert np.abs(w_big).max() < 0.1
    _, wt = fuse("lorahub", tvs, loss_fn=lambda m: torch.tensor(loss(m)), alpha=0.0)  # tensor losses accepted
    assert np.abs(wt - w_star).max() < 0.1


def test_hparam_grids_match_authors():
    assert [h["scaling"] for h in HPARAM_GRIDS["task_arithmetic"]] == [round(x, 4) for x in np.linspace(0, 1, 21)]
    ties = HPARAM_GRIDS["ties"]
    assert len(ties) == 20 and {h["k"] for h in ties} == {0.25, 0.5, 0.75, 1.0}
    assert {h["scaling"] for h in ties} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert HPARAM_GRIDS["simple_average"] == [{}] and HPARAM_GRIDS["lorahub"] == [{}]
    assert set(HPARAM_GRIDS) == set(METHODS)  # every registered method has a grid (one point when nothing to sweep)


def test_register_custom_method():
    @register_method("_test_negate")
    def negate(task_vectors, scaling: float = 1.0):
        return merge(task_vectors, scaling=-scaling)
    try:
        tvs = rand_tvs(2)
        assert fuse("_test_negate", tvs, scaling=2.0) == merge(tvs, scaling=-2.0)
        with pytest.raises(ValueError, match="already registered"): register_method("_test_negate")(negate)
        register_method("_test_negate", overwrite=True)(negate)
    finally:
        METHODS.pop("_test_negate", None)


def test_error_paths():
    tvs = rand_tvs(2)
    other = TaskVector({k: v for k, v in tvs[1].items() if k != "scalar"})
    cases = [
        (lambda: fuse("nope", tvs), ValueError, "valid methods: adamerging, concrete_adamerging, concrete_task_arithmetic, core_space, dare, dare_ties, fisher, iso_c, iso_cts, knots, lorahub, regmean, simple_average, task_arithmetic, ties, tsv_m"),
        (lambda: fuse("ties", tvs, lam=1), ValueError, "unknown hyperparameter"),
        (lambda: fuse("task_arithmetic", tvs, k=0.5), ValueError, "valid: scaling"),
        (lambda: fuse("ties", tvs, k=0.0), ValueError, r"\(0, 1\]"),
        (lambda: fuse("ties", tvs, k=-0.5), ValueError, r"\(0, 1\]"),
        (lambda: fuse("ties", tvs, k=2), ValueError, r"\(0, 1\]"),
        (lambda: fuse("ties", tvs, k=None), ValueError, r"\(0, 1\]"),
        (lambda: fuse("ties", tvs, scope="model"), ValueError, "global"),
        (lambda: fuse("ties", tvs, trim_rule="random"), ValueError, "trim_rule"),
        (lambda: fuse("ties", tvs, weights=[1, 2, 3]), ValueError, "3 weights for 2"),
        (lambda: fuse("ties", tvs, weights=[1, float("nan")]), ValueError, "finite"),
        (lambda: fuse("ties", tvs, scaling="1"), ValueError, "finite"),
        (lambda: fuse("simple_average", []), ValueError, "empty"),
        (lambda: fuse("simple_average", iter([])), ValueError, "empty"),
        (lambda: fuse("simple_average", tvs[0]), ValueError, "not a single"),
        (lambda: fuse("simple_average", [tvs[0], None]), ValueError, "must be TaskVector"),
        (lambda: fuse("simple_average", [tvs[0], other]), KeyMismatchError, "different keys"),
        (lambda: fuse("ties", [tvs[0], tvs[1].to(dtype=torch.float64)]), ValueError, "dtype"),
        (lambda: fuse("ties", [tvs[0], TaskVector({**tvs[1], "head.w": torch.zeros(96, 10)})]), ValueError, "shape"),
        (lambda: merge(tvs, combine="median"), ValueError, "combine"),
        (lambda: merge(tvs, sign_tie="random"), ValueError, "sign_tie"),
        (lambda: dense_ties_reference(tvs, k=0), ValueError, r"\(0, 1\]"),
        (lambda: kth_largest_magnitude([torch.ones(3)], 4), ValueError, "m must be in"),
        (lambda: fuse("lorahub", tvs), ValueError, "missing required hyperparameter"),
        (lambda: fuse("lorahub", tvs, loss_fn=None), ValueError, "callable"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, budget=2.5), ValueError, "positive integer"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, seed=1.5), ValueError, "seed"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, alpha=float("inf")), ValueError, "finite"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, bounds=(0.5, 1.5)), ValueError, "lo < 0 < hi"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, bounds="ab"), ValueError, "bounds"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: float("inf")), ValueError, "returned inf"),
        (lambda: fuse("lorahub", tvs, loss_fn=lambda m: 0.0, optimizer="SGD"), ValueError, "nevergrad optimizer"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match): fn()


# ------------------------------------------------------------------------------------------- hand-made exact ties
def test_zero_sign_tally_keeps_the_negative_entries_as_the_ties_reference():
    "TIES reference: resolve_zero_signs leaves sign 0 when the tally of signs is 0; torch.where(sign > 0, x > 0, x < 0) then keeps x < 0."
    tvs = [TaskVector({"x": torch.tensor([1., -2., 3.])}), TaskVector({"x": torch.tensor([-1., 2., -4.])})]
    # column sums 0, 0, -1: elected signs 0, 0, -1; tally of signs = -1 -> the zeros become -: negatives kept
    assert fuse("ties", tvs, k=1.0) == TaskVector({"x": torch.tensor([-1., -2., -4.])})
    tvs = [TaskVector({"x": torch.tensor([1., -2., 3., 5.])}), TaskVector({"x": torch.tensor([-1., 2., -4., 0.])})]
    # sums 0, 0, -1, 5: signs 0, 0, -, +: tally 0 -> the reference leaves sign 0 there -> the negatives survive
    ours = fuse("ties", tvs, k=1.0)
    assert ours == TaskVector({"x": torch.tensor([-1., -2., -4., 5.])})
    assert ours == dense_ties_reference(tvs, k=1.0)
    # peft / mergekit rule (sum >= 0 counts +): sign_tie="positive"
    assert fuse("ties", tvs, k=1.0, sign_tie="positive") == TaskVector({"x": torch.tensor([1., 2., -4., 5.])})


def test_zero_sign_tally_across_tensors_and_slices(monkeypatch):
    monkeypatch.setattr(F, "_SLICE", 2)
    tvs = [TaskVector({"a": torch.tensor([1., 3.]), "b": torch.tensor([-2., 7., 0.])}),
           TaskVector({"a": torch.tensor([-1., 1.]), "b": torch.tensor([2., -9., 0.])})]
    # sums a: 0, 4 (+); b: 0, -2 (-), 0 (no entry): tally 0 -> exact cancellations keep their negative entries
    assert fuse("ties", tvs, k=1.0) == TaskVector({"a": torch.tensor([-1., 2.]), "b": torch.tensor([-2., -9., 0.])})


def test_topk_keeps_exactly_floor_kn_with_ties_broken_by_position():
    tv = TaskVector({"w": torch.tensor([1., -1., 1., 2.]), "b": torch.tensor([1., 0.5])})
    # magnitudes 2 and four 1s; floor(0.5 * 6) = 3: the 2 and the first two 1s in `flatten` order (b before w)
    out = merge([tv], k=0.5)
    assert out == TaskVector({"w": torch.tensor([1., 0., 0., 2.]), "b": torch.tensor([1., 0.])})
    assert sum(int((v != 0).sum()) for v in out.values()) == keep_count(6, 0.5)
    assert out == dense_ties_reference([tv], k=0.5, scaling=1.0)
    # "authors" keeps every entry tied at its threshold (the TIES reference's |x| >= kth value)
    assert merge([tv], k=0.5, trim_rule="authors") == TaskVector({"w": torch.tensor([1., -1., 1., 2.]),
                                                                  "b": torch.tensor([1., 0.])})


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_topk_exact_count_with_heavy_ties_streamed(scope, monkeypatch):
    monkeypatch.setattr(F, "DENSE_KTH_MAX", 0); monkeypatch.setattr(F, "_SLICE", 7)
    g = torch.Generator().manual_seed(0)
    tv = TaskVector({k: torch.randint(-2, 3, s, generator=g).float() for k, s in SHAPES.items()})
    for k in (0.1, 0.3, 0.5, 0.9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per tensor, the 1-entry tensor keeps nothing (and warns)
            out = merge([tv], k=k, scope=scope)
        kept = {key: int((v != 0).sum()) for key, v in out.items()}
        nonzero = {key: int(v.count_nonzero()) for key, v in tv.items()}  # kept zeros do not show
        if scope == "global":
            assert sum(kept.values()) == min(keep_count(tv.numel(), k), sum(nonzero.values()))
            assert out == dense_ties_reference([tv], k=k)
        else: assert all(kept[key] == min(keep_count(tv[key].numel(), k), nonzero[key]) for key in tv)


def test_per_tensor_topk_tie_count_matches_peft():
    "peft's magnitude_based_pruning keeps exactly int(density * numel) entries (torch.topk), ties or not."
    from peft.utils.merge_utils import magnitude_based_pruning, ties as peft_ties
    g = torch.Generator().manual_seed(1)
    tvs = [TaskVector({"w": torch.randint(-3, 4, (40, 8), generator=g).float()}) for _ in range(3)]
    for density in (0.1, 0.25, 0.5):
        ours = [merge([tv], k=density, scope="per_tensor")["w"] for tv in tvs]
        refs = [magnitude_based_pruning(tv["w"], density) for tv in tvs]
        for o, r in zip(ours, refs):
            assert int((o != 0).sum()) == int((r != 0).sum())
            assert torch.equal(o.abs().reshape(-1).sort().values, r.abs().reshape(-1).sort().values)  # the same magnitudes kept
    # where the tie-break cannot matter (distinct magnitudes), the full TIES result equals peft's, sign ties included
    x = [TaskVector({"w": torch.tensor([1., -2., 3., 0.5])}), TaskVector({"w": torch.tensor([-1., 2., -4., 0.25])})]
    for density in (0.5, 0.75, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
            ref = peft_ties([t["w"] for t in x], torch.ones(2), density=density)
        assert torch.equal(fuse("ties", x, k=density, scope="per_tensor", sign_tie="positive")["w"], ref)


def test_per_tensor_ties_warns_about_tensors_it_empties():
    tvs = rand_tvs(2, seed=4, shapes={"w": (40, 10), "b": (32,)})
    with pytest.warns(UserWarning, match=r"keeps no entry of 1 tensor\(s\) \('b'.*scope='global'"):
        out = fuse("ties", tvs, k=0.02, scope="per_tensor")
    assert not out["b"].any() and out["w"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse("ties", tvs, k=0.02)  # global: the bias competes with the whole vector, no warning
        fuse("ties", tvs, k=0.04, scope="per_tensor")  # 32 * 0.04 = 1.28: one entry kept


def test_fp16_merge_overflow_names_the_result_tensor():
    tvs = [TaskVector({"ok": torch.ones(3, dtype=torch.float16), "w": torch.full((4,), 60000., dtype=torch.float16)})
           for _ in range(2)]
    with pytest.raises(ValueError, match=r"merged result overflows float16 in tensor 'w'.*float32"):
        fuse("task_arithmetic", tvs, scaling=1.0)
    with pytest.raises(ValueError, match=r"merged result overflows float16 in tensor 'w'"):
        fuse("ties", tvs, k=1.0, scaling=2.0)
    merged = fuse("task_arithmetic", [tv.to(dtype=torch.float32) for tv in tvs], scaling=1.0)  # the advice works
    assert merged["w"].dtype == torch.float32 and torch.equal(merged["w"], torch.full((4,), 120000.))
