"Property and regression checks of llora.task_vectors: arithmetic, round trips, streamed norms, delta_w, errors."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import math

import pytest
import torch

from llora.task_vectors import KeyMismatchError, TaskVector, check_compatible

SHAPES = {"enc.0.w": (16, 8), "enc.0.b": (16,), "enc.1.w": (4, 16), "head": (3, 4, 2)}


def rand_sd(seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_between_apply_to_round_trip(dtype):
    base, ft = rand_sd(0, dtype), rand_sd(1, dtype)
    ft = {k: base[k] + 0.01 * v for k, v in ft.items()}
    base["position_ids"] = ft["position_ids"] = torch.arange(4)
    tau = TaskVector.between(base, ft)
    assert set(tau) == set(SHAPES) and all(tau[k].dtype == dtype for k in tau)
    back = tau.apply_to(base)
    assert list(back) == list(base) and back["position_ids"] is base["position_ids"]
    eps = torch.finfo(dtype).eps
    for k in SHAPES:  # b + (f - b) == f up to one rounding of the result
        assert torch.allclose(back[k].double(), ft[k].double(), rtol=2 * eps, atol=0)


def test_apply_to_exact_for_dyadic_values():
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randint(-100, 100, s, generator=g) / 64 for k, s in SHAPES.items()}
    ft = {k: v + torch.randint(-100, 100, v.shape, generator=g) / 4096 for k, v in base.items()}
    back = TaskVector.between(base, ft).apply_to(base, scaling=1.0)
    assert all(torch.equal(back[k], ft[k]) for k in ft)


def test_between_with_trainable_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    base = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters(): p.add_(1.0)
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    tau = TaskVector.between(base, dict(model.named_parameters()), keys=keys)
    assert list(tau) == ["1.weight", "1.bias"] and not any(v.requires_grad for v in tau.values())
    assert all(torch.allclose(v, torch.ones_like(v), atol=1e-6) for v in tau.values())


def test_arithmetic_identities():
    a, b, c = (TaskVector(rand_sd(s)) for s in range(3))
    assert ((a + b) - b).allclose(a, atol=1e-6)
    assert a + b == b + a
    assert 3 * a == a * 3 and (a * 3).allclose(a + a + a, atol=1e-6)
    assert (a / 4) == (a * 0.25)
    assert -(-a) == a and (a - a).norm() == 0
    assert sum([a, b, c]) == a + b + c
    assert a * torch.tensor(2.0) == 2 * a
    import numpy as np
    assert a * np.float32(2) == 2 * a and a * np.int64(2) == 2 * a


def test_streamed_norm_dot_cosine_match_flattened():
    a, b = TaskVector(rand_sd(0)), TaskVector(rand_sd(1))
    fa, fb = a.flatten().double(), b.flatten().double()
    assert math.isclose(a.norm(), float(fa.norm()), rel_tol=1e-12)
    assert math.isclose(a.dot(b), float(fa @ fb), rel_tol=1e-10)
    assert math.isclose(a.cosine(b), float(fa @ fb / (fa.norm() * fb.norm())), rel_tol=1e-10)
    assert math.isclose(a.cosine(2.5 * a), 1.0, rel_tol=1e-12)
    # insertion order does not matter: flatten uses sorted keys
    rev = TaskVector({k: a[k] for k in reversed(list(a))})
    assert torch.equal(rev.flatten(), a.flatten()) and TaskVector.unflatten(a.flatten(), rev) == a


def test_half_precision_norm_is_accumulated_in_float64():
    big = TaskVector({"w": torch.full((100_000,), 300.0, dtype=torch.float16)})
    assert math.isclose(big.norm(), 300.0 * math.sqrt(100_000), rel_tol=1e-9)  # the fp16 sum of squares would overflow


def test_save_load(tmp_path):
    a = TaskVector(rand_sd(0))
    p = a.save(tmp_path / "a.safetensors", metadata={"task": "cola"})
    assert TaskVector.load(p) == a
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f: assert f.metadata() == {"format": "llora.TaskVector", "task": "cola"}
    views = TaskVector.unflatten(a.flatten(), a)
    assert TaskVector.load(views.save(tmp_path / "v.safetensors")) == a
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_to():
    a = TaskVector(rand_sd(0))
    h = a.to(dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in h.values())
    with pytest.raises(ValueError, match="floating-point"): a.to(dtype=torch.int32)


# ---- delta_w against peft ----

def _lora_model(module, target, r=4, alpha=8, fan_in_fan_out=False, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(module), LoraConfig(r=r, lora_alpha=alpha, target_modules=target,
                                                          fan_in_fan_out=fan_in_fan_out))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.normal_()
    return pm


def test_delta_w_matches_peft_merge():
    module = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    base = {k: v.clone() for k, v in module.state_dict().items()}
    pm = _lora_model(module, ["0", "2"], r=4, alpha=8)
    adapter = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    dw = TaskVector.delta_w(adapter, scaling=8 / 4)
    assert sorted(dw) == ["0.weight", "2.weight"]
    merged = pm.merge_and_unload().state_dict()
    for k, v in dw.apply_to(base).items(): assert torch.allclose(v, merged[k], atol=1e-5)


def test_delta_w_fan_in_fan_out_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = _lora_model(model, ["c_attn"], r=2, alpha=4, fan_in_fan_out=True)
    adapter = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    dw = TaskVector.delta_w(adapter, scaling=2.0, fan_in_fan_out=True)
    assert list(dw) == ["h.0.attn.c_attn.weight"]
    merged = pm.merge_and_unload().state_dict()
    assert torch.allclose(dw.apply_to(base)["h.0.attn.c_attn.weight"], merged["h.0.attn.c_attn.weight"], atol=1e-5)


def test_delta_w_base_layer_keys_exist_in_peft_model():
    module = torch.nn.Sequential(torch.nn.Linear(8, 6))
    pm = _lora_model(module, ["0"])
    sd = pm.state_dict()
    dw = TaskVector.delta_w({k: v for k, v in sd.items() if "lora_" in k}, 2.0, key_style="base_layer")
    assert set(dw) <= set(sd)
    new = dw.apply_to(sd)  # usable directly on the peft model's state dict
    assert set(new) == set(sd)


# ---- every error path ----

def _bad(fn, exc, match):
    with pytest.raises(exc, match=match): fn()


def test_error_paths():
    a = TaskVector(rand_sd(0))
    sd = rand_sd(1)
    cases = [
        (lambda: TaskVector({"x": torch.arange(3)}), ValueError, "floating-point"),
        (lambda: TaskVector({"x": torch.tensor([float("nan")])}), ValueError, "'x'"),
        (lambda: TaskVector("abc"), TypeError, "mapping"),
        (lambda: a + TaskVector({"enc.0.w": torch.zeros(16, 8)}), KeyMismatchError, "different keys"),
        (lambda: a + TaskVector({**a, "head": torch.zeros(2)}), ValueError, "shape"),
        (lambda: a + a.to(dtype=torch.float64), ValueError, "dtype"),
        (lambda: a - TaskVector({k: torch.zeros(v.shape, device="meta") for k, v in a.items()}, check=False),
         ValueError, "device"),
        (lambda: a * a, TypeError, "unsupported operand"),
        (lambda: a * float("nan"), ValueError, "finite"),
        (lambda: a / 0.0, ZeroDivisionError, "zero"),
        (lambda: a.cosine(0 * a), ValueError, "zero task vector"),
        (lambda: a.apply_to({"enc.0.w": sd["enc.0.w"]}), KeyError, "not in the state dict"),
        (lambda: a.apply_to({**sd, "head": sd["head"].double()}), ValueError, "dtype"),
        (lambda: a.apply_to(sd, scaling=float("inf")), ValueError, "finite"),
        (lambda: TaskVector.between(sd, {**sd, "extra": torch.ones(1)}), KeyMismatchError, "only in fine-tuned: 'extra'"),
        (lambda: TaskVector.between(sd, sd, keys=["missing"]), KeyError, "missing"),
        (lambda: TaskVector.between(sd, {**sd, "head": sd["head"] * float("inf")}), ValueError, "'head'"),
        (lambda: TaskVector.between(sd, {**sd, "head": sd["head"].half()}), ValueError, "dtype"),
        (lambda: TaskVector.unflatten(torch.zeros(3), a), ValueError, "1-D tensor"),
        (lambda: TaskVector.delta_w({"m.lora_A.weight": torch.ones(2, 3)}, 1.0), ValueError, "unpaired"),
        (lambda: TaskVector.delta_w({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2),
                                     "m.lora_magnitude_vector.default.weight": torch.ones(4)}, 1.0),
         ValueError, "strict=False"),
        (lambda: TaskVector.delta_w({"m.lora_A.weight": torch.ones(2, 3, 1, 1), "m.lora_B.weight": torch.ones(4, 2, 1, 1)}, 1.0),
         ValueError, r"need A \(r, in\)"),
        (lambda: TaskVector.delta_w({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}, "s"),
         TypeError, "real number"),
    ]
    for fn, exc, match in cases: _bad(fn, exc, match)


def test_key_mismatch_is_key_and_value_error():
    e = KeyMismatchError("x")
    assert isinstance(e, KeyError) and isinstance(e, ValueError) and str(e) == "x"
    check_compatible()  # nothing to compare is fine


def test_to_float16_overflow_raises_naming_the_tensors():
    a = TaskVector({"small": torch.ones(3), "big": torch.tensor([1e5, 1.0]), "huge": torch.tensor([-7e4])})
    with pytest.raises(ValueError, match=r"to float16 overflows \(\|x\| > 65504\) in 2 tensor\(s\): 'big', 'huge'.*float32"):
        a.to(dtype=torch.float16)
    assert a.to(dtype=torch.bfloat16)["big"].dtype == torch.bfloat16  # bfloat16's range is float32's: no overflow
    assert torch.equal(TaskVector({"x": torch.tensor([65504.0])}).to(dtype=torch.float16)["x"],
                       torch.tensor([65504.0], dtype=torch.float16))  # the largest float16 is fine
