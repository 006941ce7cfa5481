"Property checks of llora.cost: parameter counting, paired ratios of interleaved timings, merge-memory measurement."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
from torch import nn

from llora.cost import (count_parameters, authors_wrapper_copies, checkpoint_bytes, tensor_bytes, state_bytes,
                        peak_memory, interleaved_timings, paired_ratios, timing_summary, markdown_table)


def lora_mlp(r=4, d=16, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("q", nn.Linear(d, d)); base.add_module("v", nn.Linear(d, 2 * d)); base.add_module("out", nn.Linear(2 * d, 3))
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q", "v"]))


def test_count_parameters_lora_and_linearized():
    from llora.linearize import linearize_lora, lora_parameters
    r, d = 4, 16
    base_params = (d * d + d) + (2 * d * d + 2 * d) + (2 * d * 3 + 3)
    lora = r * (d + d) + r * (d + 2 * d)
    m = lora_mlp(r, d)
    c = count_parameters(m)
    assert (c["trainable"], c["params"], c["phi0"], c["total"]) == (lora, base_params + lora, 0, base_params + lora)
    assert authors_wrapper_copies(m) == (d * d + d) + (2 * d * d + 2 * d) + lora
    linearize_lora(m, impl="closed_form")
    for n, p in lora_parameters(m).items():
        if ".lora_A." in n: p.requires_grad_(False)
    c = count_parameters(m)
    assert c["trainable"] == r * d + r * 2 * d          # B only
    assert c["phi0"] == r * d + r * d                    # A0 only: the all-zero B0 is not stored
    assert c["total"] == base_params + lora + c["phi0"]
    assert abs(c["trainable_pct"] - 100 * c["trainable"] / c["total"]) < 1e-9


def test_checkpoint_and_state_bytes():
    m = lora_mlp()
    sd = {n: p for n, p in m.named_parameters() if p.requires_grad}
    raw = sum(p.numel() * 4 for p in sd.values())
    assert raw < checkpoint_bytes(sd) < raw + 4096           # safetensors: data + a JSON header
    x = torch.zeros(100)
    assert tensor_bytes([x, x[10:], x.view(10, 10)]) == 400  # shared storage counted once
    lin = nn.Linear(4, 4)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(1, 4)).sum().backward(); opt.step()
    assert state_bytes(lin, grads=False) == 20 * 4
    assert state_bytes(lin) == 2 * 20 * 4
    assert state_bytes(lin, opt, grads=False) >= 3 * 20 * 4


def test_ratios_from_interleaved_timings():
    "Ratios are medians of per-repeat ratios of interleaved runs; the order rotates."
    clock = {"t": 0.0}
    log = []
    per_call = {"a": [2, 20, 2], "b": [1, 10, 1]}     # a drift of 10x in round 1 hits both functions
    calls = {"a": iter(per_call["a"]), "b": iter(per_call["b"])}
    def mk(n):
        def f():
            log.append(n)
            clock["t"] += next(calls[n]) if len(log) > 2 else 0   # warm-up calls take no time
        return f
    tm = interleaved_timings({"a": mk("a"), "b": mk("b")}, repeats=3, steps=1, warmup=1, clock=lambda: clock["t"])
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]           # warm-up, then rotated rounds
    assert list(tm.name) == ["a", "b", "b", "a", "a", "b"]
    rt = paired_ratios(tm, {"a/b": ("a", "b")}).iloc[0]
    assert (rt["median"], rt["min"], rt["max"], rt["n"]) == (2.0, 2.0, 2.0, 3)
    s = timing_summary(tm).set_index("name")
    assert s.loc["a", "s_per_step"] == 2.0 and s.loc["b", "it_per_s"] == 1.0


def test_paired_ratio_is_not_ratio_of_medians():
    tm = pd.DataFrame([dict(repeat=r, name=n, s_per_step=v) for r, (a, b) in enumerate([(3, 1), (30, 10), (8, 8)])
                       for n, v in (("a", a), ("b", b))])
    assert paired_ratios(tm, {"x": ("a", "b")}).iloc[0]["median"] == 3.0


def test_peak_memory_cpu_counts_torch_allocations():
    with peak_memory("cpu") as pm:
        a = torch.empty(1_000_000)          # 4 MB
        b = torch.empty(3_000_000)          # 12 MB while a is alive -> 16 MB
        del a, b
        c = torch.empty(250_000)            # 1 MB
    assert abs(pm["peak_bytes"] - 16e6) < 0.05e6, pm
    assert "profiler" in pm["how"]


def test_merge_memory_dense_reference_is_n_copies():
    "The dense reference's peak extra memory holds the n stacked flattened vectors; measurement sees it."
    pytest.importorskip("llora.task_vectors")
    from llora.cost import random_task_vectors, dense_task_arithmetic_reference
    shapes = {"w1": (256, 256), "b1": (256,), "w2": (512, 256)}
    n = 5
    tvs = random_task_vectors(shapes, n=n, seed=0)
    one = tensor_bytes(tvs[0])
    with peak_memory("cpu") as pm: out = dense_task_arithmetic_reference(tvs, scaling=0.5)
    assert pm["peak_bytes"] >= n * one                     # the stacked matrix
    assert pm["peak_bytes"] <= (2 * n + 3) * one           # (the authors' vstack of a list: 2n copies) + a few
    assert torch.allclose(out["w2"], 0.5 * sum(tv["w2"] for tv in tvs), atol=1e-6)


def test_merge_cost_streamed_vs_dense():
    pytest.importorskip("llora.fusion")
    from llora.cost import random_task_vectors, merge_cost
    shapes = {f"l{i}.weight": (128, 128) for i in range(8)}
    tvs = random_task_vectors(shapes, n=4, seed=0)
    mc = merge_cost(tvs, repeats=1).set_index(["method", "impl"])
    assert (mc.max_abs_diff_vs_first_impl < 1e-5).all()
    for m in ("task_arithmetic", "ties"):
        dense, streamed = mc.loc[(m, "dense")], mc.loc[(m, "llora.fusion")]
        assert dense.extra_beyond_output_in_tvs >= 4 - 1e-6               # n flattened copies
        assert streamed.peak_extra_MB < dense.peak_extra_MB
        assert streamed.peak_extra_MB >= streamed.output_MB - 1e-9        # the output itself is allocated


def test_markdown_table():
    md = markdown_table(pd.DataFrame(dict(x=[1234567, 2], y=[0.12345, float("nan")])))
    assert md.splitlines() == ["| x | y |", "|---|---|", "| 1,234,567 | 0.1235 |", "| 2 | – |"]


def test_a_merge_worker_killed_for_memory_names_the_way_out(monkeypatch):
    "A merge subprocess killed by the kernel (exit -9, out of memory) raises MemoryError naming the stand-alone script."
    import subprocess
    import llora.cost as C
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -9, "", ""))
    with pytest.raises(MemoryError, match=r"merge_table\.py"):
        C.merge_cost_isolated(n=2, shapes={"w": (4, 4)})
