"Property and regression checks of `llora.linearize` (fast, CPU, offline): tangent models, L-LoRA, export, merging."
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from llora.linearize import (ATTENTION_PATTERNS, ClosedFormLoraLinear, JvpLoraLinear, LinearizedModelWrapper,
                             export_lora_adapter, linear_layers_only, linearization_point, linearize_lora,
                             linearized_layers, lora_delta_weights, lora_parameters, plain_lora_model,
                             unlinearize_lora)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

D = torch.float64
IMPLS = ["closed_form", "jvp"]


# ----------------------------------------------------------------------------------------------------------- helpers
def mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("q", nn.Linear(6, 8)); m.add_module("act", nn.Tanh())
    m.add_module("v", nn.Linear(8, 8)); m.add_module("act2", nn.Tanh()); m.add_module("out", nn.Linear(8, 3))
    return m.to(D)


def lora_mlp(seed=0, init=True, dropout=0.0, **kw):
    torch.manual_seed(seed + 100)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], lora_dropout=dropout, init_lora_weights=init, **kw)
    return get_peft_model(mlp(seed), cfg).to(D)


def tiny_bert(seed=0, dropout=0.1):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertModel(cfg).to(D)


def lora_bert(seed=0, init=True, dropout=0.1, r=4):
    torch.manual_seed(seed + 100)
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout, init_lora_weights=init)
    return get_peft_model(tiny_bert(seed, dropout), cfg).to(D)


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=D)


def run_bert(m, train=False, seed=7, grad=False):
    m.train(train); torch.manual_seed(seed)
    y = m(input_ids=IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state
    return y if grad else y.detach()


def run_mlp(m, train=False, seed=7, grad=False):
    m.train(train); torch.manual_seed(seed)
    y = m(X)
    return y if grad else y.detach()


def perturb(model, seed=3, scale=0.5, which=("lora_A", "lora_B")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(w in n for w in which): p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def trainable_names(m): return [n for n, p in m.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ LinearizedModelWrapper
def test_wrapper_equals_model_at_phi0_and_is_affine():
    m = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(D).eval()
    m[0].weight.requires_grad_(False)
    lin = LinearizedModelWrapper(m)
    assert lin.names == ["0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert trainable_names(lin) == [f"model.{n}" for n in lin.names]
    assert all(b.startswith("phi0_") for b in lin._buffer_names)
    x = torch.randn(7, 3, dtype=D)
    torch.testing.assert_close(lin(x), m(x), rtol=0, atol=1e-13)
    phi0 = {n: t.clone() for n, t in lin.params0.items()}
    v = {n: torch.randn_like(t) for n, t in phi0.items()}
    params = dict(lin.model.named_parameters())

    def at(t):
        with torch.no_grad():
            for n in phi0: params[n].copy_(phi0[n] + t * v[n])
        return lin(x).detach()
    f0, f1, f3 = at(0.0), at(1.0), at(3.0)
    torch.testing.assert_close(f3 - f0, 3 * (f1 - f0))
    ref = copy.deepcopy(m)
    rp = dict(ref.named_parameters())

    def ref_at(t):
        with torch.no_grad():
            for n in phi0: rp[n].copy_(phi0[n] + t * v[n])
        return ref(x)
    e = 1e-6
    torch.testing.assert_close(f1 - f0, (ref_at(e) - ref_at(-e)) / (2 * e), rtol=1e-6, atol=1e-7)


def test_wrapper_gradient_is_jacobian_at_phi0():
    m = mlp()
    lin = LinearizedModelWrapper(m)
    ref = copy.deepcopy(m)
    perturb(lin, which=("model.",), scale=0.3)   # move phi away from phi0: the Jacobian stays the one at phi0
    y = lin(X)
    g_out = torch.randn_like(y)
    (y * g_out).sum().backward()
    (ref(X) * g_out).sum().backward()
    for n, p in lin.model.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad)


def test_wrapper_tuple_dict_kwargs_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__(); self.body, self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 2), nn.Linear(4, 1)

        def forward(self, x, *, scale=1.0):
            h = torch.tanh(self.body(x)) * scale
            return self.a(h), {"b": self.b(h), "label": self.a(h).argmax(-1)}
    th = TwoHeads().to(D)
    lin = LinearizedModelWrapper(th)
    with torch.no_grad():
        (ya, d), (ra, rd) = lin(X, scale=2.0), th(X, scale=2.0)
    torch.testing.assert_close(ya, ra); torch.testing.assert_close(d["b"], rd["b"])
    assert torch.equal(d["label"], rd["label"]) and d["label"].dtype == torch.int64


def test_wrapper_init_module_and_persistence():
    a, b = mlp(0), mlp(5)
    lin = LinearizedModelWrapper(a, init_module=b)
    torch.testing.assert_close(lin.func0(X), b(X))
    assert set(lin.state_dict()) == {f"model.{k}" for k in a.state_dict()} | set(lin._buffer_names)
    lin_np = LinearizedModelWrapper(mlp(0), persistent=False)
    assert set(lin_np.state_dict()) == {f"model.{k}" for k in a.state_dict()}


@pytest.mark.parametrize("train", [False, True])
def test_wrapper_full_bert(train):
    "Full-model NTK linearization of a BERT (SDPA attention has no forward AD in its fused kernels: math backend)."
    bert = tiny_bert()
    lin = LinearizedModelWrapper(bert)
    out, ref = run_bert(lin, train), run_bert(bert, train)
    torch.testing.assert_close(out, ref)
    assert sum(b.numel() for b in lin.buffers()) == sum(p.numel() for p in bert.parameters()) + sum(
        b.numel() for b in bert.buffers())


@pytest.mark.parametrize("make,msg", [
    (lambda: LinearizedModelWrapper(mlp().requires_grad_(False)), "no trainable parameter"),
    (lambda: LinearizedModelWrapper(mlp(), init_module=nn.Linear(6, 3)), "no parameter"),
    (lambda: LinearizedModelWrapper(nn.Linear(6, 3), init_module=nn.Linear(6, 4)), "shape"),
])
def test_wrapper_errors(make, msg):
    with pytest.raises(ValueError, match=msg): make()


# ------------------------------------------------------------------------------------------------- linearize_lora
@pytest.mark.parametrize("impl", IMPLS)
def test_linearized_equals_lora_at_phi0_names_unchanged(impl):
    m = lora_bert()
    names, keys = trainable_names(m), set(m.state_dict())
    y, y_tr = run_bert(m), run_bert(m, train=True)
    sd_keys = set(get_peft_model_state_dict(m))
    linearize_lora(m, impl=impl)
    assert trainable_names(m) == names and names[0].endswith("query.lora_A.default.weight")
    assert set(m.state_dict()) == keys                     # phi0 buffers are not persistent
    assert set(get_peft_model_state_dict(m)) == sd_keys
    assert len(linearized_layers(m)) == 4
    cls = ClosedFormLoraLinear if impl == "closed_form" else JvpLoraLinear
    assert all(type(l) is cls for l in linearized_layers(m).values())
    torch.testing.assert_close(run_bert(m), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(run_bert(m, train=True), y_tr, rtol=0, atol=1e-14)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_closed_form_equals_jvp(init, train):
    cf = perturb(linearize_lora(lora_bert(init=init), "closed_form"))
    jv = perturb(linearize_lora(lora_bert(init=init), "jvp"))
    ycf, yjv = run_bert(cf, train, grad=True), run_bert(jv, train, grad=True)
    torch.testing.assert_close(ycf, yjv, rtol=1e-10, atol=1e-10)
    ycf.pow(2).sum().backward(); yjv.pow(2).sum().backward()
    gj = {n: p.grad for n, p in jv.named_parameters() if p.requires_grad}
    for n, p in cf.named_parameters():   # closed form leaves A out of the graph when B0 = 0: no grad means zero grad
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(g, gj[n], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_on_A_exactly_zero_with_default_init(impl):
    m = perturb(linearize_lora(lora_bert(), impl), which=("lora_B",))
    run_bert(m, train=True, grad=True).pow(2).sum().backward()
    for n, p in lora_parameters(m).items():
        if ".lora_A." in n:   # closed form: A is not in the graph at all (no grad, so no optimizer state or decay)
            if impl == "closed_form": assert p.grad is None, n
            else: assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
        else: assert torch.count_nonzero(p.grad) > 0, n


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_is_the_tangent_of_the_lora_layer(impl):
    "Per layer, f_lin(phi0 + t v) - f(phi0) = t * finite-difference JVP of the original LoRA layer (B0 != 0)."
    orig = lora_mlp(init=False)
    lin = linearize_lora(copy.deepcopy(orig), impl)
    p0 = {n: p.detach().clone() for n, p in lora_parameters(orig).items()}
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(t.shape, generator=g, dtype=D) for n, t in p0.items()}
    x = torch.randn(5, 6, dtype=D)

    def layer_at(model, t):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in p0: params[n].copy_(p0[n] + t * v[n])
            return model.base_model.model.q(x)
    e = 1e-6
    fd = (layer_at(orig, e) - layer_at(orig, -e)) / (2 * e)
    y0 = layer_at(orig, 0.0)
    torch.testing.assert_close(layer_at(lin, 1.0) - y0, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer_at(lin, -2.5) - y0, -2.5 * fd, rtol=1e-6, atol=1e-7)


def test_training_closed_form_and_jvp_identical():
    "A few AdamW steps (weight decay on) give the same parameters with both implementations."
    models = [linearize_lora(lora_mlp(init=False, dropout=0.2), impl) for impl in IMPLS]
    opts = [torch.optim.AdamW(lora_parameters(m).values(), lr=1e-2, weight_decay=0.1) for m in models]
    for step in range(3):
        for m, o in zip(models, opts):
            o.zero_grad(); run_mlp(m, train=True, seed=step, grad=True).pow(2).mean().backward(); o.step()
    a, b = (lora_parameters(m) for m in models)
    for n in a: torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-11)


def test_fan_in_fan_out_gpt2():
    "GPT-2's Conv1D layers (fan_in_fan_out=True): both impls agree, merging and export reproduce the outputs."
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).to(D)
    base0 = copy.deepcopy(base)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    pm = get_peft_model(base, cfg).to(D)
    jv = perturb(linearize_lora(copy.deepcopy(pm), "jvp"))
    cf = perturb(linearize_lora(pm, "closed_form"))
    ids = torch.randint(0, 50, (2, 5))
    y = cf.eval()(input_ids=ids).last_hidden_state.detach()
    torch.testing.assert_close(jv.eval()(input_ids=ids).last_hidden_state.detach(), y)
    sd, info = export_lora_adapter(cf)
    plain = plain_lora_model(copy.deepcopy(base0), sd, info["config"]).eval()
    torch.testing.assert_close(plain(input_ids=ids).last_hidden_state.detach(), y)
    merged = copy.deepcopy(cf).merge_and_unload().eval()
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state.detach(), y)


# -------------------------------------------------------------------------------------------- export and merging
@pytest.mark.parametrize("init,doubled", [(True, False), (False, True)])
def test_export_reproduces_linearized_model(init, doubled):
    lm = perturb(linearize_lora(lora_bert(init=init)))
    sd, info = export_lora_adapter(lm)
    assert info["rank_doubled"] is doubled and info["adapter_name"] == "default"
    assert set(info["ranks"].values()) == {8 if doubled else 4} and info["config"].r == (8 if doubled else 4)
    assert set(sd) == set(trainable_names(lora_bert()))
    plain = plain_lora_model(tiny_bert(), sd, info["config"])
    assert not linearized_layers(plain)
    for train in (False, True):
        torch.testing.assert_close(run_bert(plain, train), run_bert(lm, train), rtol=1e-10, atol=1e-10)
    if not doubled:   # rank r: the exported A is A0 (the drifted A is ignored)
        for name, layer in linearized_layers(lm).items():
            assert torch.equal(sd[f"{name}.lora_A.default.weight"], layer.phi0("lora_A.default.weight"))


@pytest.mark.parametrize("init", [True, False])
def test_merging_gives_the_same_function(init):
    lm = perturb(linearize_lora(lora_bert(init=init)))
    y = run_bert(lm)
    base = tiny_bert()
    with torch.no_grad():
        for n, dw in lora_delta_weights(lm).items(): base.get_submodule(n.removeprefix("base_model.model.")).weight += dw
    torch.testing.assert_close(run_bert(base), y)
    torch.testing.assert_close(run_bert(copy.deepcopy(lm).merge_and_unload()), y)
    lm.merge_adapter(); torch.testing.assert_close(run_bert(lm), y)       # merged in place
    lm.unmerge_adapter(); torch.testing.assert_close(run_bert(lm), y)


def test_lora_delta_weights_plain_lora():
    m = perturb(lora_mlp())
    q = m.base_model.model.q
    dw = lora_delta_weights(m)
    assert set(dw) == {"base_model.model.q", "base_model.model.v"}
    torch.testing.assert_close(dw["base_model.model.q"], 2.0 * q.lora_B.default.weight @ q.lora_A.default.weight)


def test_export_with_lora_bias_and_rslora():
    lm = perturb(linearize_lora(lora_mlp(init=False, lora_bias=True, use_rslora=True)), which=("lora_",))
    sd, info = export_lora_adapter(lm)
    assert any(k.endswith("lora_B.default.bias") for k in sd)
    assert info["config"].use_rslora is False
    torch.testing.assert_close(info["config"].lora_alpha / info["config"].r, 6 / 3 ** 0.5)
    plain = plain_lora_model(mlp(), sd, info["config"])
    torch.testing.assert_close(run_mlp(plain), run_mlp(lm))
    torch.testing.assert_close(run_mlp(copy.deepcopy(lm).merge_and_unload()), run_mlp(lm))


def test_export_non_uniform_scaling_uses_patterns():
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=False,
                     rank_pattern={"v": 2}, alpha_pattern={"v": 8})
    torch.manual_seed(1)
    lm = perturb(linearize_lora(get_peft_model(mlp(), cfg).to(D)))
    sd, info = export_lora_adapter(lm)
    assert info["config"].rank_pattern and info["config"].alpha_pattern
    torch.testing.assert_close(run_mlp(plain_lora_model(mlp(), sd, info["config"])), run_mlp(lm))


# ------------------------------------------------------------------------------------- checkpoints and adapters
def test_peft_state_dict_roundtrip_and_reload_with_init_state():
    trained = linearize_lora(lora_bert(init=False))
    phi0 = {k: v.clone() for k, v in linearization_point(trained).items()}
    assert set(phi0) == set(trainable_names(trained))
    perturb(trained)
    y, sd = run_bert(trained), get_peft_model_state_dict(trained)
    fresh = perturb(lora_bert(init=False), seed=99)
    set_peft_model_state_dict(fresh, sd)
    linearize_lora(fresh, init_state=phi0)
    torch.testing.assert_close(run_bert(fresh), y, rtol=0, atol=1e-14)
    with tempfile.TemporaryDirectory() as d:
        trained.save_pretrained(d)
        reloaded = linearize_lora(PeftModel.from_pretrained(tiny_bert(), d), init_state=phi0)
        torch.testing.assert_close(run_bert(reloaded), y, rtol=0, atol=1e-14)


def test_deepcopy_dtype_and_unlinearize():
    m = perturb(linearize_lora(lora_mlp(init=False)))
    y = run_mlp(m)
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(run_mlp(m2), y)
    m32 = copy.deepcopy(m).float()
    assert all(b.dtype == torch.float32 for n, b in m32.named_buffers() if "phi0_" in n)
    torch.testing.assert_close(m32(X.float()).detach(), y.float(), rtol=1e-4, atol=1e-5)
    unlinearize_lora(m2)
    assert not linearized_layers(m2) and not any("phi0_" in n for n, _ in m2.named_buffers())
    assert trainable_names(m2) == trainable_names(m)
    linearize_lora(m2)   # can be linearized again


def test_multiple_adapters_and_disabled_adapters():
    m = lora_bert()
    m.add_adapter("other", LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    linearize_lora(perturb(m))
    assert {l.linearized_adapters for l in linearized_layers(m).values()} == {("default",)}
    m.set_adapter("other")
    with pytest.raises(RuntimeError, match="not linearized"): run_bert(m)
    m.set_adapter("default")
    with m.disable_adapter():
        torch.testing.assert_close(run_bert(m), run_bert(tiny_bert()))


# ---------------------------------------------------------------------------------------------------- error paths
def _merged():
    m = lora_mlp(); m.merge_adapter(); return m


@pytest.mark.parametrize("make,msg", [
    (lambda: linearize_lora(lora_mlp(), impl="ntk"), r"valid: \['closed_form', 'jvp'\]"),
    (lambda: linearize_lora(mlp()), "nothing was linearized"),
    (lambda: linearize_lora(tiny_bert()), "nothing was linearized"),
    (lambda: linearize_lora(get_peft_model(tiny_bert(), LoraConfig(target_modules=["word_embeddings", "query"]))),
     "only peft lora.Linear"),
    (lambda: linearize_lora(get_peft_model(nn.Sequential(nn.Conv2d(1, 2, 3)), LoraConfig(target_modules=["0"]))),
     "only peft lora.Linear"),
    (lambda: linearize_lora(get_peft_model(mlp(), LoraConfig(target_modules=["q"], use_dora=True))), "DoRA"),
    (lambda: linearize_lora(linearize_lora(lora_mlp())), "already linearized"),
    (lambda: linearize_lora(_merged()), "unmerge first"),
    (lambda: linearize_lora(lora_mlp(), init_state={}), "init_state lacks"),
    (lambda: unlinearize_lora(lora_mlp()), "no linearized"),
    (lambda: linearization_point(lora_mlp()), "no linearized"),
    (lambda: export_lora_adapter(lora_mlp()), "not linearized"),
    (lambda: export_lora_adapter(linearize_lora(lora_mlp()), adapter="x"), "not linearized"),
    (lambda: lora_delta_weights(mlp()), "no LoRA"),
    (lambda: lora_parameters(mlp()), "no trainable LoRA"),
    (lambda: lora_parameters(lora_mlp(), adapter="x"), "'x'"),
    (lambda: plain_lora_model(mlp(), {}, None), "config is None"),
    (lambda: plain_lora_model(mlp(), {}, LoraConfig(target_modules=["q"])), "lacks"),
    (lambda: linear_layers_only(mlp()), "no parameter matches"),
    (lambda: linear_layers_only(mlp(), patterns=[]), "no pattern"),
])
def test_errors(make, msg):
    with pytest.raises(ValueError, match=msg): make()


def test_mixed_batch_not_supported():
    m = linearize_lora(lora_mlp()).eval()
    with pytest.raises(NotImplementedError, match="mixed"): m(X, adapter_names=["default"] * len(X))


def test_plain_lora_model_rejects_foreign_keys_and_shapes():
    sd, info = export_lora_adapter(perturb(linearize_lora(lora_mlp())))
    with pytest.raises(ValueError, match="foo"): plain_lora_model(mlp(), {**sd, "foo.weight": torch.zeros(1)}, info["config"])
    sd2, info2 = export_lora_adapter(perturb(linearize_lora(lora_mlp(init=False))))
    with pytest.raises(ValueError, match="shape"): plain_lora_model(mlp(), sd2, info["config"])


# ------------------------------------------------------------------------------------------------ lora_parameters
def test_lora_parameters():
    m = linearize_lora(lora_bert())
    p = lora_parameters(m)
    assert list(p) == trainable_names(lora_bert())
    assert all(isinstance(t, nn.Parameter) for t in p.values())
    p[next(iter(p))].requires_grad_(False)
    assert len(lora_parameters(m)) == len(p) - 1          # only trainable ones
    assert len(lora_parameters(m, adapter="default")) == len(p) - 1


# --------------------------------------------------------------------------------------------- linear_layers_only
def test_linear_layers_only_bert():
    bert = tiny_bert()
    names = linear_layers_only(bert)
    assert len(names) == 8 and trainable_names(bert) == names
    assert not any("intermediate" in n or n.endswith("layer.0.output.dense.weight") for n in names)
    assert len(linear_layers_only(bert, bias=True)) == 16
    assert linear_layers_only(bert, patterns=r"layer\.1\.attention\.self\.query\.weight$") == \
        ["encoder.layer.1.attention.self.query.weight"]


def test_linear_layers_only_clip_t5_mha():
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5Model
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=8, patch_size=4))
    names = linear_layers_only(clip)
    assert len(names) == 8 and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for n in names)
    t5 = T5Model(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    assert len(linear_layers_only(t5)) == 12
    mha = nn.ModuleDict(dict(attn=nn.MultiheadAttention(8, 2), mlp=nn.Linear(8, 8)))
    assert linear_layers_only(mha) == ["attn.in_proj_weight", "attn.out_proj.weight"]


def test_linear_layers_only_open_clip():
    oc = pytest.importorskip("open_clip")
    from open_clip.transformer import Transformer
    t = Transformer(width=16, layers=2, heads=2)
    names = linear_layers_only(t)
    assert names == [f"resblocks.{i}.attn.{k}" for i in range(2) for k in ("in_proj_weight", "out_proj.weight")]


def test_linear_layers_only_error_leaves_model_unchanged():
    m = mlp(); m.q.weight.requires_grad_(False)
    with pytest.raises(ValueError): linear_layers_only(m)
    assert not m.q.weight.requires_grad and m.v.weight.requires_grad
    assert len(ATTENTION_PATTERNS) == 5
