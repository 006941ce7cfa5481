"""`llora.context.MergeContext` with AdaMerging and Fisher merging, for every model family and fine-tuning mode."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from llora.context import MergeContext
from llora.fusion import fuse
from llora.task_vectors import TaskVector
from llora.tasks import Task
from llora.train import prepare, theta0

_rng = np.random.default_rng(0)
PICTURES = [{"image": Image.fromarray(_rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), "label": i % 2} for i in range(6)]


def tasks_for(family):
    "Two small tasks the family serves (images for CLIP, text otherwise)."
    def text(name, words):
        ex = [{"text": f"{w} number {i}", "label": k} for i in range(3) for k, w in enumerate(words)]
        return Task(name, classes=["no", "yes"], label_descriptions=list(words), loader=lambda t, s: list(ex))
    if family == "clip":
        return [Task(f"ctx-img-{i}", classes=["circle", "square"], templates=["a photo of a {c}."], modality="image",
                     loader=lambda t, s, i=i: PICTURES[i::2] + PICTURES[:2]) for i in range(2)]
    return [text("ctx-t-a", ["bad film", "good film"]), text("ctx-t-b", ["sad song", "happy song"])]


def random_tvs(m, n=2, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TaskVector({k: torch.randn(v.shape, generator=g) * scale for k, v in theta0(m).items()}) for _ in range(n)]


@pytest.mark.parametrize("name, family", [("minilm-l6", "text"), ("clip-vit-b-16-hf", "clip"), ("flan-t5-base", "text")])
@pytest.mark.parametrize("mode", ["full", "lora", "l_lora"])
def test_adamerging_and_fisher_on_every_family_and_mode(name, family, mode):
    m = prepare(name, mode, tiny=True)
    tvs = random_tvs(m)
    ctx = MergeContext(m, tasks_for(family), n_examples=6, batch_size=6)
    start = {k: (0.3 * tvs[0][k] + 0.3 * tvs[1][k]).requires_grad_(True) for k in tvs[0]}
    h0 = ctx.entropy(start)
    assert h0.dim() == 0 and torch.isfinite(h0) and h0.requires_grad
    merged, lam = fuse("adamerging", tvs, objective=ctx.entropy, steps=8, lr=5e-2)
    assert lam.shape == (2,) and bool(((lam >= 0) & (lam <= 1)).all())
    h0.backward()
    got = [v.grad is not None for v in start.values()]  # differentiable in the task vector (full: unused params excepted)
    assert all(got) if mode != "full" else any(got)
    assert float(ctx.entropy(merged)) <= float(h0) + 1e-6  # one batch per task: a deterministic objective, descended
    fs = ctx.fishers(tvs)
    assert all(set(f) == set(tv) and all(f[k].shape == tv[k].shape and bool((f[k] >= 0).all()) for k in f)
               for f, tv in zip(fs, tvs))
    assert any(float(f[k].sum()) > 0 for f in fs for k in f)
    fm = fuse("fisher", tvs, fishers=fs)
    assert all(torch.isfinite(v).all() for v in fm.values())


def test_layer_wise_and_determinism():
    m = prepare("minilm-l6", "lora", tiny=True)
    tvs = random_tvs(m)
    runs = [fuse("adamerging", tvs, objective=MergeContext(m, tasks_for("text"), n_examples=6, batch_size=6).entropy,
                 granularity="layer", steps=4, lr=5e-2)[1] for _ in range(2)]
    assert runs[0].shape == (2, len(tvs[0])) and torch.equal(runs[0], runs[1])


def test_model_left_as_it_was():
    "The context only reads the model: parameters and training mode are unchanged afterwards."
    m = prepare("minilm-l6", "lora", tiny=True)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.train()
    ctx = MergeContext(m, tasks_for("text"), n_examples=6, batch_size=6)
    tvs = random_tvs(m)
    fuse("adamerging", tvs, objective=ctx.entropy, steps=2); ctx.fishers(tvs)
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_bad_input():
    with pytest.raises(ValueError, match="not built by `prepare`"):
        from llora.models import get_model
        MergeContext(get_model("minilm-l6", tiny=True), tasks_for("text"))


@pytest.mark.parametrize("name, family", [("minilm-l6", "text"), ("clip-vit-b-16-hf", "clip"), ("flan-t5-base", "text")])
@pytest.mark.parametrize("mode", ["full", "linear_only", "lora", "l_lora"])
def test_regmean_grams(name, family, mode):
    """Grams of every linear weight (symmetric, positive semi-definite, in × in); one task twice merges to itself. LoRA
    task vectors: RegMean merges the ΔW the model runs (L-LoRA: the first order), with the Grams of each base layer."""
    from llora.context import lora_delta_space
    from llora.evaluate import applied
    from llora.linearize import lora_delta_weights
    lora = mode in ("lora", "l_lora")
    m = prepare(name, mode, tiny=True)
    tvs = random_tvs(m, scale=0.05 if lora else 0.02)
    grams = MergeContext(m, tasks_for(family), n_examples=6, batch_size=6).grams(tvs)
    vecs = lora_delta_space(m, tvs) if lora else tvs
    assert grams[0] and set(grams[0]) == set(grams[1]) <= set(vecs[0])
    for k, G in grams[0].items():
        assert G.shape == (vecs[0][k].shape[1],) * 2 and torch.allclose(G, G.T, atol=1e-5)
        assert float(torch.linalg.eigvalsh(G.double()).min()) > -1e-4
    merged = fuse("regmean", vecs, grams=grams)
    assert all(torch.isfinite(v).all() for v in merged.values())
    same = fuse("regmean", [vecs[0], vecs[0]], grams=[grams[0], grams[0]])
    for k in grams[0]:  # every weight: the decoder's ReLU-fed Grams are the ill-conditioned ones (cond ≈ 1e7)
        torch.testing.assert_close(same[k], vecs[0][k], rtol=1e-3, atol=1e-4)
    if not lora: return
    assert set(grams[0]) == {k for k in vecs[0] if k.endswith("base_layer.weight")}
    before = lora_delta_weights(m.backbone)  # θ0's own s·B0 A0 (zero with peft's B0 = 0)
    with applied(m, tvs[0], fold_lora=False):
        ran = {k: v - before[k] for k, v in lora_delta_weights(m.backbone).items()}
    assert len(ran) == len(grams[0])
    for layer, dw in ran.items():  # the ΔW the model runs, layer by layer
        key = next(k for k in vecs[0] if k.endswith(layer + ".base_layer.weight"))
        torch.testing.assert_close(vecs[0][key], dw, rtol=1e-4, atol=1e-6)
    ctx = MergeContext(m, tasks_for(family), n_examples=4, batch_size=4)
    with applied(m, merged):  # the merged ΔW applies to the base weights
        assert torch.isfinite(ctx.outputs(0, ctx._batches[0][0], {})).all()


def test_loss_is_the_models_training_loss_and_reads_the_labels():
    "LoraHub's objective: the mean training loss over the tasks, at θ0 + merged."
    from llora.evaluate import applied
    m = prepare("minilm-l6", "lora", tiny=True)
    tasks = tasks_for("text")
    ctx = MergeContext(m, tasks, n_examples=6, batch_size=3)
    tv = random_tvs(m, n=1)[0]
    with applied(m, tv, fold_lora=False), torch.no_grad():
        m.eval()
        want = np.mean([np.mean([float(m.loss(t, b)) for b in bs]) for t, bs in zip(ctx.tasks, ctx._batches)])
    assert abs(ctx.loss(tv) - want) < 1e-5 and ctx.loss(tv) != ctx.loss({})


@pytest.mark.parametrize("mode", ["lora", "l_lora", "full"])
def test_concrete_methods_run_on_a_model(mode):
    "The seed's Concrete Task Arithmetic and Concrete AdaMerging through MergeContext.entropy: binary masks over every tensor."
    m = prepare("minilm-l6", mode, tiny=True)
    tvs = random_tvs(m)
    ctx = MergeContext(m, tasks_for("text"), n_examples=6, batch_size=6)
    merged, mask = fuse("concrete_task_arithmetic", tvs, objective=ctx.entropy, steps=3, lr=0.1)
    assert set(mask) == set(tvs[0]) and all(bool(((v == 0) | (v == 1)).all()) for v in mask.values())
    assert all(torch.isfinite(v).all() for v in merged.values())
    merged, lam, mask = fuse("concrete_adamerging", tvs, objective=ctx.entropy, steps=3, ada_steps=3, lr=0.1)
    assert lam.shape == (2,) and all(torch.isfinite(v).all() for v in merged.values())


@pytest.mark.parametrize("share", [0.5, 1])
def test_lora_delta_space_follows_each_layer_of_a_partially_linearized_model(share):
    """Partial linearization (`prepare(..., linearize=)`): the ΔW the LoRA-native merges see is, layer by layer, the one
    the model runs: first order in the linearized layers, s·B·A in the plain ones (whose A moved too)."""
    from llora.context import lora_delta_space, lora_space
    from llora.evaluate import applied
    from llora.fusion import lora_delta_vectors
    from llora.linearize import linearized_layers, lora_delta_weights
    m = prepare("minilm-l6", "l_lora", tiny=True, linearize=share)
    tvs = random_tvs(m, scale=0.3)
    assert any(".lora_A." in k for k in tvs[0]) == (share < 1)  # the plain layers' A is trainable
    vecs = lora_delta_space(m, tvs)
    with applied(m, tvs[0], fold_lora=False):
        ran = lora_delta_weights(m.backbone)
    assert len(ran) == 4 and len(linearized_layers(m.backbone)) == round(4 * share)
    for layer, dw in ran.items():
        key = next(k for k in vecs[0] if k.endswith(layer + ".base_layer.weight"))
        torch.testing.assert_close(vecs[0][key], dw, rtol=1e-4, atol=1e-6)
    factors, kw = lora_space(m, tvs)
    assert kw["linearized"] == {f"{n}.default" for n in linearized_layers(m)}
    if share < 1:  # treating every layer as linearized would be wrong for the plain ones
        wrong = lora_delta_vectors(factors, **{**kw, "linearized": True})[0]
        assert any(not torch.allclose(wrong[k], vecs[0][k]) for k in vecs[0] if k.endswith("base_layer.weight"))
        with pytest.raises(ValueError, match="not LoRA layers"):
            lora_delta_vectors(factors, **{**kw, "linearized": {"backbone.nope.default"}})
