"""The data-free merge methods of issue 13: DARE, DARE-TIES, TSV-M, Iso-C, Iso-CTS, KnOTS, Core Space.

Identities first, then cross-checks against FusionBench 0.2.33's formulas on identical inputs, then bad input.
FusionBench cannot be imported here without its full dependency set (`fusion_bench/__init__.py` imports
`fusion_bench.tasks`, which needs omegaconf/hydra, lightning, ...), so the `fb_*` references below re-create the
formulas of `fusion_bench/method/task_singular_vector/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`,
`method/isotropic_merging/iso_utils.py::iso_c, iso_cts`, `method/knots/knots_utils.py::subspace_alignment` and
`method/dare/utils.py::param_random_drop_` as read from the 0.2.33 wheel (zero-padded buffers and all).
"""
import copy
import pytest, torch

import llora.fusion as F
from llora.fusion import (HPARAM_GRIDS, METHODS, dare_drop, dense_ties_reference, fuse, iso_cts_dims,
                          lora_delta_vectors, lora_expansion_point, lora_factors)
from llora.task_vectors import KeyMismatchError, TaskVector

SHAPES = {"l1.w": (24, 16), "l1.b": (24,), "l2.w": (8, 24), "s": ()}


def rand_tvs(n, shapes=SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [TaskVector({k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()})
            for _ in range(n)]


def close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a: torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# --- DARE -----------------------------------------------------------------------------------------------------------
def test_dare_with_p0_is_task_arithmetic_bit_for_bit():
    tvs = rand_tvs(3)
    assert fuse("dare", tvs, p=0) == fuse("task_arithmetic", tvs)  # the defaults agree too (scaling 0.3)
    for lam in (0.3, 1.0, -0.5):
        for seed in (0, 7):
            assert fuse("dare", tvs, p=0, scaling=lam, seed=seed) == fuse("task_arithmetic", tvs, scaling=lam)


@pytest.mark.filterwarnings("ignore:.*per_tensor trim")
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("trim_rule", ["topk", "authors"])
def test_dare_ties_with_p0_is_ties(scope, trim_rule):
    tvs = rand_tvs(4, seed=1)
    for k in (0.2, 0.5, 1.0):
        kw = dict(k=k, scaling=0.7, scope=scope, trim_rule=trim_rule)
        assert fuse("dare_ties", tvs, p=0, **kw) == fuse("ties", tvs, **kw)
    assert fuse("dare_ties", tvs, p=0, k=0.5, weights=[1, 0.5, 2, 1]) == fuse("ties", tvs, k=0.5, weights=[1, 0.5, 2, 1])


def test_dare_seeds_are_deterministic_and_matter():
    tvs = rand_tvs(3, seed=2)
    for name in ("dare", "dare_ties"):
        a = fuse(name, tvs, p=0.6, seed=3)
        assert a == fuse(name, tvs, p=0.6, seed=3)
        assert a != fuse(name, tvs, p=0.6, seed=4)
    # the mask depends on (seed, position, key), not on the order the keys are stored in
    rev = [TaskVector({k: tv[k] for k in reversed(list(tv))}) for tv in tvs]
    close(fuse("dare", rev, p=0.6, seed=3), fuse("dare", tvs, p=0.6, seed=3), atol=0)
    assert dare_drop(tvs[0], 0.6, seed=3, position=0) != dare_drop(tvs[0], 0.6, seed=3, position=1)
    # a fixed hash: the same masks in every process and release (regression value)
    assert F._drop_seed(0, 0, "a") == F._drop_seed(0, 0, "a") == 2640209955015288148


def test_dare_drop_statistics():
    tv = TaskVector({"w": torch.randn(400, 250, generator=torch.Generator().manual_seed(0))})
    for p in (0.1, 0.5, 0.9):
        d = dare_drop(tv, p, seed=1)["w"]
        kept = d != 0
        n = kept.numel()
        assert abs(float(kept.float().mean()) - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
        torch.testing.assert_close(d[kept], tv["w"][kept] / (1 - p))
    mean = sum(dare_drop(tv, 0.5, seed=s) for s in range(200)) / 200  # unbiased: E[drop(τ)] = τ
    assert (mean - tv).norm() / tv.norm() < 0.1 < (dare_drop(tv, 0.5, seed=0) - tv).norm() / tv.norm()


def test_dare_is_task_arithmetic_and_ties_of_the_dropped_vectors(monkeypatch):
    tvs = rand_tvs(3, seed=3)
    dropped = [dare_drop(tv, 0.4, seed=9, position=i) for i, tv in enumerate(tvs)]
    close(fuse("dare", tvs, p=0.4, seed=9, scaling=0.8), fuse("task_arithmetic", dropped, scaling=0.8))
    for k in (0.3, 1.0):
        assert fuse("dare_ties", tvs, p=0.4, seed=9, k=k) == fuse("ties", dropped, k=k)
    monkeypatch.setattr(F, "DENSE_KTH_MAX", 0)  # the streamed radix select reads the lazily dropped tensors too
    assert fuse("dare_ties", tvs, p=0.4, seed=9, k=0.3) == fuse("ties", dropped, k=0.3)


def test_dare_matches_fusionbench_drop_and_dare_ties():
    "param_random_drop_: mask = rand > p, x * mask / (1 - p); DareTiesMerging: then ties_merging (top-k, authors' trim)."
    tvs = rand_tvs(3, seed=4)
    p, seed = 0.3, 5
    fb = []
    for i, tv in enumerate(tvs):  # the same uniform draws FusionBench would use, from our generator
        out = {}
        for key, x in tv.items():
            u = torch.rand(x.shape, generator=torch.Generator().manual_seed(F._drop_seed(seed, i, key)))
            out[key] = x * (u > p) / (1 - p)
        fb.append(TaskVector(out))
    for i, tv in enumerate(tvs): close(dare_drop(tv, p, seed, position=i), fb[i], atol=1e-6)
    # FusionBench's merge_func="mean" is our disjoint mean; its threshold trim keeps ties (trim_rule="authors")
    close(fuse("dare_ties", tvs, p=p, seed=seed, k=0.2, trim_rule="authors", scaling=0.5),
          dense_ties_reference(fb, k=0.2, trim_rule="authors", scaling=0.5))


# --- TSV-M, Iso-C, Iso-CTS -------------------------------------------------------------------------------------------
def fb_tsvm(tvs):
    "compute_and_sum_svd_mem_reduction, transcribed: zero-padded sum_u/sum_s/sum_vh, polar factors by SVD."
    n, out = len(tvs), {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            out[key] = sum(tv[key] for tv in tvs) / n; continue
        for i, tv in enumerate(tvs):
            u, s, vh = torch.linalg.svd(tv[key], full_matrices=False)
            if i == 0: su, ss, svh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
            r = int(s.shape[0] * (1 / n))
            su[:, i * r:(i + 1) * r], ss[i * r:(i + 1) * r], svh[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
        uu, _, vu = torch.linalg.svd(su, full_matrices=False)
        uv, _, vv = torch.linalg.svd(svh, full_matrices=False)
        out[key] = (uu @ vu) @ torch.diag(ss) @ (uv @ vv)
    return TaskVector(out)


def fb_iso_c(tvs):
    out = {}
    for key in tvs[0]:
        m = sum(tv[key] for tv in tvs) / len(tvs)
        if m.dim() == 2:
            U, S, V = torch.linalg.svd(m * len(tvs), full_matrices=False)
            m = U @ torch.diag(torch.ones_like(S) * S.mean()) @ V
        out[key] = m
    return TaskVector(out)


def fb_iso_cts(tvs, frac):
    n, out = len(tvs), {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            out[key] = sum(tv[key] for tv in tvs) / n; continue
        d = min(tvs[0][key].shape)
        c = int(d * frac)
        c = d - round((d - c) / n) * n
        u, s, v = torch.linalg.svd(sum(tv[key] for tv in tvs), full_matrices=False)
        cu, cs, cv = u[:, :c], s[:c], v[:c]
        per = int((d - c) / n)
        for i, tv in enumerate(tvs):
            w = tv[key]
            ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
            if i == 0: bu, bs, bv = torch.zeros_like(ut), torch.zeros_like(st), torch.zeros_like(vt)
            bu[:, i * per:(i + 1) * per], bs[i * per:(i + 1) * per], bv[i * per:(i + 1) * per] = ut[:, :per], st[:per], vt[:per]
        bu[:, n * per:n * per + c], bs[n * per:n * per + c], bv[n * per:n * per + c] = cu, cs, cv
        a, _, b = torch.linalg.svd(bu, full_matrices=False); bu = a @ b
        a, _, b = torch.linalg.svd(bv, full_matrices=False); bv = a @ b
        out[key] = bu @ torch.diag(torch.ones_like(bs) * bs.mean()) @ bv
    return TaskVector(out)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_svd_methods_match_fusionbench_formulas(n):
    tvs = rand_tvs(n, seed=10 + n, dtype=torch.float64)
    close(fuse("tsv_m", tvs), fb_tsvm(tvs), atol=1e-10)
    close(fuse("tsv_m", tvs, scaling=0.5), 0.5 * fb_tsvm(tvs), atol=1e-10)
    close(fuse("iso_c", tvs, scaling=1.5), 1.5 * fb_iso_c(tvs), atol=1e-10)
    for frac in (0.8, 0.5, 0.3):  # (a tiny fraction can make the reference's rounding overshoot d)
        close(fuse("iso_cts", tvs, common_fraction=frac), fb_iso_cts(tvs, frac), atol=1e-10)


def test_svd_methods_on_one_task_vector():
    one = rand_tvs(1, seed=20)
    close(fuse("tsv_m", one, scaling=0.7), 0.7 * one[0])  # k = d: nothing dropped, nothing rotated
    iso = fuse("iso_c", one)
    for key in ("l1.w", "l2.w"):
        U, S, Vh = torch.linalg.svd(one[0][key], full_matrices=False)
        torch.testing.assert_close(iso[key], (U * S.mean()) @ Vh)
        torch.testing.assert_close(torch.linalg.svdvals(iso[key]), S.mean().expand(S.shape))  # a flat spectrum
    assert iso["l1.b"].equal(one[0]["l1.b"]) and iso["s"].equal(one[0]["s"])  # not matrices: the mean, i.e. τ


def test_tsv_m_of_orthogonal_tasks_is_their_sum():
    g = torch.Generator().manual_seed(21)
    Qu, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    Qv, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    tvs = [TaskVector({"w": Qu[:, 4 * i:4 * i + 4] @ torch.diag(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
                       @ Qv[:, 4 * i:4 * i + 4].T}) for i in range(4)]  # rank 4 = d/T each, mutually orthogonal
    close(fuse("tsv_m", tvs), fuse("task_arithmetic", tvs, scaling=1.0), atol=1e-12)


def test_iso_merges_have_flat_spectra_and_iso_cts_generalizes_iso_c():
    tvs = rand_tvs(4, seed=22, dtype=torch.float64)
    for name in ("iso_c", "iso_cts"):
        s = torch.linalg.svdvals(fuse(name, tvs)["l1.w"])
        torch.testing.assert_close(s, s[0].expand(s.shape))
    close(fuse("iso_cts", tvs, common_fraction=1.0), fuse("iso_c", tvs), atol=1e-10)
    assert iso_cts_dims(768, 8, 0.8) == (616, 19) and iso_cts_dims(16, 7, 0.8) == (9, 1)
    assert iso_cts_dims(3, 4, 0.0) == (3, 0)  # the reference's rounding would need 4 > 3 directions: rounded down


def test_tsv_m_with_more_tasks_than_directions_merges_that_matrix_to_zero():
    tvs = rand_tvs(9, {"w": (8, 5), "b": (8,)}, seed=23)
    out = fuse("tsv_m", tvs)
    assert not out["w"].any() and out["b"].allclose(sum(tv["b"] for tv in tvs) / 9)


# --- KnOTS and Core Space --------------------------------------------------------------------------------------------
def experts(ranks, shared_A=False, seed=30, d_out=12, d_in=10, B0=False, dtype=torch.float64):
    "Factor task vectors of two LoRA layers (`m1`, `m2`, peft names) and a plain entry; optionally their point."
    g = torch.Generator().manual_seed(seed)
    A0 = {m: torch.randn(ranks[0], d_in, generator=g, dtype=dtype) for m in ("m1", "m2")}
    tvs = []
    for r in ranks:
        d = {}
        for m in ("m1", "m2"):
            d[f"{m}.lora_A.default.weight"] = A0[m] if shared_A else torch.randn(r, d_in, generator=g, dtype=dtype)
            d[f"{m}.lora_B.default.weight"] = torch.randn(d_out, r, generator=g, dtype=dtype)
        d["head.bias"] = torch.randn(3, generator=g, dtype=dtype)
        tvs.append(TaskVector(d))
    point = {k: v.clone() for k, v in tvs[0].items() if "lora_" in k}
    for m in ("m1", "m2"):
        point[f"{m}.lora_A.default.weight"] = A0[m]
        point[f"{m}.lora_B.default.weight"] = (torch.randn(d_out, ranks[0], generator=g, dtype=dtype) if B0
                                               else torch.zeros(d_out, ranks[0], dtype=dtype))
    return tvs, point


def delta_ws(tvs, scale, point=None):
    "The dense per-task ΔW_i = s_i (B_i A_i - B0 A0) and the plain entries, as task vectors."
    out = []
    for i, tv in enumerate(tvs):
        s = scale[i] if isinstance(scale, (list, tuple)) else scale
        d = {}
        for m in ("m1", "m2"):
            dw = tv[f"{m}.lora_B.default.weight"] @ tv[f"{m}.lora_A.default.weight"]
            if point is not None: dw = dw - point[f"{m}.lora_B.default.weight"] @ point[f"{m}.lora_A.default.weight"]
            d[f"{m}.base_layer.weight"] = s * dw
        out.append(TaskVector({**d, "head.bias": tv["head.bias"]}))
    return out


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_lora_native_task_arithmetic_is_lossless_with_different_ranks(method):
    tvs, _ = experts([2, 3, 5])
    scale = [2.0, 0.5, 1.0]
    got = fuse(method, tvs, scale=scale, merge_with="task_arithmetic", scaling=0.4)
    close(got, fuse("task_arithmetic", delta_ws(tvs, scale), scaling=0.4), atol=1e-10)
    assert int(torch.linalg.matrix_rank(got["m1.base_layer.weight"])) == 10  # min(Σ r_i, d) = min(10, 10)
    close(fuse(method, tvs, scale=2.0, merge_with="simple_average"), fuse("simple_average", delta_ws(tvs, 2.0)),
          atol=1e-10)


@pytest.mark.parametrize("method", ["knots", "core_space"])
def test_lora_native_subtract_the_expansion_point(method):
    tvs, point = experts([3, 3, 3], B0=True)
    got = fuse(method, tvs, scale=2.0, point=point, merge_with="task_arithmetic", scaling=1.0)
    close(got, fuse("task_arithmetic", delta_ws(tvs, 2.0, point), scaling=1.0), atol=1e-10)


def test_l_lora_experts_reduce_to_merging_the_Bs():
    "Shared A0: task arithmetic in either space is s·(λ Σ B_i)·A0; Core Space keeps every merge of the form B' A0."
    tvs, point = experts([4, 4, 4], shared_A=True, seed=31)
    A0 = point["m1.lora_A.default.weight"]
    Bs = [TaskVector({"B": tv["m1.lora_B.default.weight"]}) for tv in tvs]
    want = 2.0 * fuse("task_arithmetic", Bs, scaling=0.6)["B"] @ A0
    for method in ("knots", "core_space"):
        got = fuse(method, tvs, scale=2.0, merge_with="task_arithmetic", scaling=0.6)["m1.base_layer.weight"]
        torch.testing.assert_close(got, want)
    P = torch.linalg.pinv(A0) @ A0  # projector onto A0's row space
    for merge_with, hp in [("ties", dict(k=0.3)), ("dare", dict(p=0.5)), ("tsv_m", {}), ("iso_c", {}), ("dare_ties", {})]:
        dw = fuse("core_space", tvs, scale=2.0, merge_with=merge_with, **hp)["m1.base_layer.weight"]
        torch.testing.assert_close(dw @ P, dw)  # = B' A0: still an L-LoRA update with the frozen A0
        assert int(torch.linalg.matrix_rank(dw)) <= 4
    kt = fuse("knots", tvs, scale=2.0, merge_with="ties", k=0.3)["m1.base_layer.weight"]
    assert (kt @ P - kt).norm() > 1e-3 * kt.norm()  # KnOTS-TIES trims entries of V_i and leaves A0's row space


@pytest.mark.parametrize("B0", [False, True])
def test_linearized_lora_products_are_the_first_order_delta_w(B0):
    "linearized=True: ΔW_i = s((B_i - B0) A0 + B0 (A_i - A0)), what an L-LoRA layer adds to θ0's; merges act on it."
    tvs, point = experts([3, 3], B0=B0, seed=33)  # the A_i differ from A0, as weight decay makes them in L-LoRA runs
    got = lora_delta_vectors(tvs, 2.0, point, linearized=True)
    for tv, dw in zip(tvs, got):
        for m in ("m1", "m2"):
            A, B = tv[f"{m}.lora_A.default.weight"], tv[f"{m}.lora_B.default.weight"]
            A0, B0_ = point[f"{m}.lora_A.default.weight"], point[f"{m}.lora_B.default.weight"]
            torch.testing.assert_close(dw[f"{m}.base_layer.weight"], 2.0 * ((B - B0_) @ A0 + B0_ @ (A - A0)))
        assert torch.equal(dw["head.bias"], tv["head.bias"])
    for i, dw in enumerate(lora_delta_vectors(tvs, 2.0, point)): close(dw, delta_ws(tvs, 2.0, point)[i], atol=1e-10)
    for method in ("knots", "core_space"):  # with task arithmetic inside, both merge exactly the ΔW_i they are given
        merged = fuse(method, tvs, scale=2.0, point=point, linearized=True, merge_with="task_arithmetic", scaling=0.7)
        close(merged, fuse("task_arithmetic", got, scaling=0.7), atol=1e-10)
    with pytest.raises(ValueError, match="linearized=True needs `point`"): lora_delta_vectors(tvs, 2.0, linearized=True)


def fb_knots_basis(dws, eps=1e-4):
    "subspace_alignment, transcribed: SVD of the column-wise concatenation in float64, σ > eps kept, Vh split per task."
    U, S, Vh = torch.linalg.svd(torch.cat(dws, dim=1).double(), full_matrices=False)
    U, Vh, S = U[:, S > eps], Vh[S > eps], S[S > eps]
    return U, S, torch.split(Vh, dws[0].shape[1], dim=1)


@pytest.mark.parametrize("merge_with,hp", [("ties", dict(k=0.4, scaling=0.8)), ("task_arithmetic", dict(scaling=0.3)),
                                           ("dare", dict(p=0.3, seed=2))])
def test_knots_matches_fusionbench_subspace_alignment(merge_with, hp):
    tvs, _ = experts([3, 3, 3], seed=32)
    one_layer = [TaskVector({k: v for k, v in tv.items() if k.startswith("m1.")}) for tv in tvs]
    dws = [2.0 * tv["m1.lora_B.default.weight"] @ tv["m1.lora_A.default.weight"] for tv in tvs]
    U, S, Vhs = fb_knots_basis(dws)
    merged = fuse(merge_with, [TaskVector({"m1.base_layer.weight": v.contiguous()}) for v in Vhs], **hp)
    want = U @ torch.diag(S) @ merged["m1.base_layer.weight"]  # singular-vector signs do not matter (see notebook)
    got = fuse("knots", one_layer, scale=2.0, merge_with=merge_with, **hp)["m1.base_layer.weight"]
    if merge_with == "dare": assert got.shape == want.shape  # the masks depend on the SVD's signs: shapes only
    else: torch.testing.assert_close(got, want)


@pytest.mark.parametrize("merge_with", ["tsv_m", "iso_c", "iso_cts"])
def test_core_space_with_orthogonally_equivariant_merges_matches_a_dense_reference(merge_with):
    "SVD merges commute with rotations, so any bases spanning the B's and A's give the same result."
    tvs, _ = experts([3, 4, 4], seed=33)  # ranks >= TSV-M's k: a rank-deficient task makes its SVD ambiguous
    dws = delta_ws(tvs, 1.5)
    UB = torch.linalg.svd(torch.cat([tv["m1.lora_B.default.weight"] for tv in tvs], 1), full_matrices=False)[0]
    VA = torch.linalg.svd(torch.cat([tv["m1.lora_A.default.weight"] for tv in tvs], 0), full_matrices=False)[2]
    cores = [TaskVector({"c": UB.T @ dw["m1.base_layer.weight"] @ VA.T}) for dw in dws]
    want = UB @ fuse(merge_with, cores)["c"] @ VA
    got = fuse("core_space", tvs, scale=1.5, merge_with=merge_with)
    torch.testing.assert_close(got["m1.base_layer.weight"], want)
    torch.testing.assert_close(got["head.bias"], sum(tv["head.bias"] for tv in tvs) / 3)


def test_lora_expansion_point_and_factors_on_a_peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 6))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    point, scales = lora_expansion_point(model)
    assert scales == {"base_model.model.0.default": 2.0}
    kA, kB = "base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight"
    assert set(point) == {kA, kB} and not point[kB].any()
    g = torch.Generator().manual_seed(1)
    taus = [TaskVector({kB: torch.randn(6, 2, generator=g)}) for _ in range(2)]  # L-LoRA: only B trains
    factors = [lora_factors(t, point) for t in taus]
    assert factors[0][kA].equal(point[kA]) and factors[0][kB].equal(taus[0][kB])
    merged = fuse("core_space", factors, scale=scales, merge_with="task_arithmetic", scaling=1.0)
    key = "base_model.model.0.base_layer.weight"
    params = dict(model.named_parameters())
    assert list(merged) == [key] and key in params  # the parameter the update belongs to
    x = torch.randn(5, 10, generator=g)
    with torch.no_grad():
        params[kB].copy_(taus[0][kB] + taus[1][kB])  # the model with the summed B's ...
        want = model(x)
        params[kB].zero_()
        params[key].add_(merged[key])  # ... equals the base layer plus the merged ΔW
        torch.testing.assert_close(model(x), want)


# --- grids and the sweep's lists -------------------------------------------------------------------------------------
def test_grids_cover_the_new_methods_and_the_sweep_points_come_from_them():
    from llora.sweep import ALL_METHODS, EMBEDDED_GRIDS, SMOKE_GRIDS
    new = ("dare", "dare_ties", "tsv_m", "iso_c", "iso_cts", "knots", "core_space")
    assert set(new) <= set(METHODS) and set(HPARAM_GRIDS) == set(METHODS) and set(ALL_METHODS) <= set(METHODS)
    assert set(ALL_METHODS) == set(METHODS)  # `-p method all` runs every registered method
    for name in new[:5]:
        assert all(hp in HPARAM_GRIDS[name] for hp in EMBEDDED_GRIDS[name]), name
        assert len(SMOKE_GRIDS[name]) == 1
    tvs = rand_tvs(2)
    for name in new[:5]:
        for hp in HPARAM_GRIDS[name]: fuse(name, tvs, **hp)
    ftvs, _ = experts([2, 2])
    for name in ("knots", "core_space"):
        for hp in HPARAM_GRIDS[name][:3]: fuse(name, ftvs, scale=1.0, **hp)


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input_fails_clearly():
    tvs = rand_tvs(2)
    ftvs, point = experts([2, 3])
    bad_shape = [tvs[0], TaskVector({**tvs[1], "l1.w": torch.ones(16, 24)})]
    unpaired = [TaskVector({k: v for k, v in tv.items() if k != "m2.lora_B.default.weight"}) for tv in ftvs]
    wrong_r = [ftvs[0], TaskVector({**ftvs[1], "m1.lora_B.default.weight": torch.ones(12, 2, dtype=torch.float64)})]
    wrong_in = [ftvs[0], TaskVector({**ftvs[1], "m1.lora_A.default.weight": torch.ones(3, 11, dtype=torch.float64)})]
    cases = [
        (lambda: fuse("dare", tvs, p=1.0), "p (DARE drop rate) must be in [0, 1), got 1.0"),
        (lambda: fuse("dare", tvs, p=-0.1), "must be in [0, 1)"),
        (lambda: fuse("dare_ties", tvs, p="0.5"), "must be in [0, 1)"),
        (lambda: fuse("dare_ties", tvs, p=float("nan")), "must be in [0, 1)"),
        (lambda: fuse("dare", tvs, seed=None), "seed must be an integer"),
        (lambda: dare_drop(tvs[0], 1.5), "dare_drop: p (DARE drop rate)"),
        (lambda: fuse("dare", tvs, density=0.5), "unknown hyperparameter(s) density; valid: p, scaling, seed"),
        (lambda: fuse("dare_ties", tvs, k=0), "k (fraction of entries kept) must be in (0, 1]"),
        (lambda: fuse("iso_cts", tvs, common_fraction=-0.1), "common_fraction must be in [0, 1]"),
        (lambda: fuse("tsv_m", tvs, scaling=float("inf")), "scaling must be a finite real number"),
        (lambda: fuse("iso_c", bad_shape), "differ in shape"),
        (lambda: fuse("knots", tvs, scale=1.0), "hold no LoRA factors"),
        (lambda: fuse("core_space", ftvs), "missing required hyperparameter(s) scale"),
        (lambda: fuse("core_space", unpaired, scale=1.0), "without both lora_A and lora_B: ['m2.default']"),
        (lambda: fuse("knots", wrong_r, scale=1.0), "need A (r, in) and B (out, r)"),
        (lambda: fuse("core_space", wrong_in, scale=1.0), "differ in shape"),
        (lambda: fuse("knots", ftvs, scale=[1.0]), "1 scales for 2 task vectors"),
        (lambda: fuse("knots", ftvs, scale=float("nan")), "scale must be a finite real number"),
        (lambda: fuse("knots", ftvs, scale={"m1.default": 1.0}), "no entry for LoRA layer 'm2.default'"),
        (lambda: fuse("knots", ftvs, scale=1.0, merge_with="lorahub"), "merge_with must be one of"),
        (lambda: fuse("core_space", ftvs, scale=1.0, merge_with="knots"), "merge_with must be one of"),
        (lambda: fuse("core_space", ftvs, scale=1.0, merge_with="ties", kk=1), "ties: unknown hyperparameter(s) kk"),
        (lambda: fuse("knots", ftvs, scale=1.0, point={}), "point lacks the factors of LoRA layer"),
        (lambda: fuse("knots", ftvs, scale=1.0, point={**point, "m1.lora_A.default.weight": torch.ones(2, 9)}),
         "do not fit task vector #0"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError) as e: fn()
        assert msg in str(e.value), (msg, str(e.value))
    with pytest.raises(KeyMismatchError, match="not in the expansion point"):
        lora_factors(TaskVector({"x.lora_B.default.weight": torch.ones(2, 2)}), point)
    with pytest.raises(ValueError, match="no LoRA layers"): lora_expansion_point(torch.nn.Linear(2, 2))
    with pytest.raises(KeyMismatchError, match="different keys"): fuse("knots", [ftvs[0], tvs[0]], scale=1.0)


# --- FusionBench itself, where it is installed with its dependencies (the dev extra) ---------------------------------
def _fusionbench(module):
    return pytest.importorskip(module, reason="fusion-bench and its dependencies (omegaconf, hydra, lightning) not installed")


def test_against_fusionbench_itself():
    "The same comparisons as above, against FusionBench 0.2.33's own functions instead of their transcriptions."
    iso = _fusionbench("fusion_bench.method.isotropic_merging.iso_utils")
    tsvm = _fusionbench("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
    knots_utils = _fusionbench("fusion_bench.method.knots.knots_utils")
    ties_utils = _fusionbench("fusion_bench.method.ties_merging.ties_merging_utils")
    tvs = rand_tvs(3, seed=40, dtype=torch.float64)
    plain = lambda: [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    close(fuse("tsv_m", tvs), TaskVector(tsvm.compute_and_sum_svd_mem_reduction(plain(), accelerator="cpu")), atol=1e-10)
    close(fuse("iso_c", tvs), TaskVector(iso.iso_c(plain(), accelerator="cpu")), atol=1e-10)
    close(fuse("iso_cts", tvs, common_fraction=0.8), TaskVector(iso.iso_cts(plain(), 0.8, accelerator="cpu")), atol=1e-10)
    # DareTiesMerging = ties_merging(dropped, reset_thresh=20, merge_func) on the flattened task vectors
    dropped = [dare_drop(tv, 0.3, seed=1, position=i) for i, tv in enumerate(tvs)]
    flat = ties_utils.ties_merging(torch.vstack([d.flatten() for d in dropped]), reset_thresh=20, merge_func="mean")
    close(fuse("dare_ties", tvs, p=0.3, seed=1, k=0.2, trim_rule="authors"), TaskVector.unflatten(flat, tvs[0]), atol=1e-10)
    # KnOTS: FusionBench ships the basis (subspace_alignment), not a merge method
    ftvs, _ = experts([3, 3, 3], seed=41)
    one_layer = [TaskVector({k: v for k, v in tv.items() if k.startswith("m1.")}) for tv in ftvs]
    dws = [2.0 * tv["m1.lora_B.default.weight"] @ tv["m1.lora_A.default.weight"] for tv in ftvs]
    U, S, Vhs = knots_utils.subspace_alignment(dws)
    merged = fuse("ties", [TaskVector({"w": v.contiguous()}) for v in Vhs], k=0.4)["w"]
    torch.testing.assert_close(fuse("knots", one_layer, scale=2.0, k=0.4)["m1.base_layer.weight"], U @ torch.diag(S) @ merged)


def test_adapters_is_linear_must_not_take_per_matrix_svd_merges_for_linear():
    "Per-matrix SVD merges are the mean on 1-D probes; llora.adapters.is_linear probes with matrices and sees them."
    from llora.adapters import is_linear
    assert is_linear("task_arithmetic", 3, scaling=0.5) and is_linear("simple_average", 3)
    assert not is_linear("dare", 3)
    for name in ("tsv_m", "iso_c", "iso_cts"):
        assert not is_linear(name, 3), name


def test_fisher_against_fusionbench_itself():
    """Fisher merging: FusionBench's `merging_with_fisher_weights` on the fine-tuned parameters θ_i = θ0 + τ_i equals
    θ0 + `fuse("fisher")` when its per-model Fisher-norm normalization is off (`normalize_fisher_weight=False`; the
    paper's formula, which llora implements) and its floor is llora's `eps`."""
    fm = _fusionbench("fusion_bench.method.fisher_merging.fisher_merging")
    tvs = rand_tvs(3, seed=42, dtype=torch.float64)
    g = torch.Generator().manual_seed(43)
    fishers = [{k: torch.rand(v.shape, generator=g, dtype=torch.float64) ** 3 for k, v in tvs[0].items()} for _ in tvs]
    theta0 = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in tvs[0].items()}
    params = {k: [theta0[k] + tv[k] for tv in tvs] for k in theta0}
    theirs = fm.merging_with_fisher_weights(params, fishers, torch.ones(len(tvs), dtype=torch.float64),
                                            normalize_fisher_weight=False, minimal_fisher_weight=1e-6)
    ours = fuse("fisher", tvs, fishers=fishers, eps=1e-6)
    for k in theta0: torch.testing.assert_close(theirs[k], theta0[k] + ours[k], rtol=1e-10, atol=1e-10)


def test_regmean_against_fusionbench_itself():
    """RegMean: FusionBench's `merging_with_regmean_weights` on θ_i = θ0 + τ_i (Grams keyed by module name, its
    `reduce_non_diagonal_ratio` = llora's `alpha`) equals θ0 + `fuse("regmean")`; tensors without a Gram are averaged."""
    rm = _fusionbench("fusion_bench.method.regmean.regmean")
    g = torch.Generator().manual_seed(44)
    tvs = [TaskVector({"l.weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
                       "l.bias": torch.randn(5, generator=g, dtype=torch.float64)}) for _ in range(3)]
    grams = []
    for _ in tvs:
        X = torch.randn(20, 4, generator=g, dtype=torch.float64)
        grams.append({"l.weight": X.T @ X})
    theta0 = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in tvs[0].items()}
    params = {k: [theta0[k] + tv[k] for tv in tvs] for k in theta0}
    theirs = rm.merging_with_regmean_weights(params, [{"l": G["l.weight"]} for G in grams], reduce_non_diagonal_ratio=0.9)
    ours = fuse("regmean", tvs, grams=grams, alpha=0.9)
    # the same formula; FusionBench inverts Σ G explicitly where llora solves: float64 rounding of the two, ~1e-8
    for k in theta0: torch.testing.assert_close(theirs[k], theta0[k] + ours[k], rtol=1e-6, atol=1e-7)


def test_svd_merges_survive_lapack_convergence_failures(monkeypatch):
    """Fault injection: LAPACK's gesdd fails to converge on some residuals (seen: Iso-CTS on 7 ViT-B/16-shaped task
    vectors); the SVD merges then retry in float64 (and, failing that, with a 1e-12 perturbation) and give the same merge."""
    import llora.fusion as Fu
    tvs = rand_tvs(3, seed=45)
    want = {m: fuse(m, tvs) for m in ("tsv_m", "iso_c", "iso_cts")}
    real, calls = torch.linalg.svd, []
    def flaky(X, *a, **k):
        calls.append(X.dtype)
        if X.dtype != torch.float64 or len(calls) % 3 == 2: raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(X, *a, **k)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    for m, w in want.items():
        got = fuse(m, tvs)
        for k in w: torch.testing.assert_close(got[k], w[k], rtol=1e-4, atol=1e-5)
    assert torch.float32 in calls and torch.float64 in calls


def _toy_experts(n=3, seed=40):
    "A small MLP θ0, n fine-tuned copies (torch modules, as FusionBench's wrappers take them) and unlabeled inputs."
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        for p in base.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    experts = []
    for _ in range(n):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.3)
        experts.append(e)
    return base, experts, torch.randn(32, 6, generator=g)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_matches_fusionbench_merged_models(granularity):
    """FusionBench's TaskWiseMergedModel / LayerWiseMergedModel with its entropy_loss and Adam, step for step: the same λ
    (its clamp acts on the merge, ours projects λ; both stay inside [0, 1] here, where the two agree)."""
    tw = _fusionbench("fusion_bench.models.wrappers.task_wise_fusion")
    lw = _fusionbench("fusion_bench.models.wrappers.layer_wise_fusion")
    ent = _fusionbench("fusion_bench.method.adamerging.entropy_loss")
    base, experts, x = _toy_experts()
    steps, lr = 25, 1e-2
    if granularity == "task":
        fb = tw.TaskWiseMergedModel(torch.full((3,), 0.3), copy.deepcopy(base), copy.deepcopy(experts))
    else:
        fb = lw.LayerWiseMergedModel(torch.full((3, 4), 0.3), copy.deepcopy(base), copy.deepcopy(experts))
    opt = torch.optim.Adam([fb.merge_weight], lr=lr)
    for _ in range(steps):
        fb.merge_weights()
        loss = ent.entropy_loss(fb(x))
        opt.zero_grad(); loss.backward(); opt.step()
    t0 = dict(base.named_parameters())
    tvs = [TaskVector({k: v.detach() - t0[k].detach() for k, v in e.named_parameters()}) for e in experts]
    def objective(merged):
        out = torch.func.functional_call(base, {k: t0[k].detach() + v for k, v in merged.items()}, (x,))
        p = out.softmax(-1)
        return -(p * out.log_softmax(-1)).sum(-1).mean()
    _, lam = fuse("adamerging", tvs, objective=objective, granularity=granularity, steps=steps, lr=lr)
    assert bool(((fb.merge_weight > 0) & (fb.merge_weight < 1)).all())  # no clamping on either side
    assert float((fb.merge_weight - 0.3).abs().max()) > 0.1  # λ travelled
    torch.testing.assert_close(lam, fb.merge_weight.detach(), rtol=1e-4, atol=1e-5)


def test_concrete_mask_is_fusionbench_relaxed_bernoulli():
    "FusionBench's MaskModel samples its continuous masks from RelaxedBernoulli(logits, T): the same law, and the same draws from the same uniforms."
    mm = _fusionbench("fusion_bench.models.masks.mask_model")
    model = mm.MaskModel({"w": torch.zeros(500, 40)}, parameter_type="logits")
    with torch.no_grad(): model.w.copy_(torch.linspace(-3, 3, 20000).reshape(500, 40))
    torch.manual_seed(7); fb = model.sample_mask("continuous", temperature=0.5)["w"]
    torch.manual_seed(7); ours = F.concrete_mask(model.w.detach(), 0.5)
    torch.testing.assert_close(ours, fb.detach(), rtol=1e-4, atol=1e-4)  # u clamped at 1e-6 here, at float eps there
