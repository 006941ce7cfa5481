"llora.adapters: merged PEFT adapters load in plain peft and equal the dense merge; rank, semantics, CLI, error paths."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import configparser, json, math, subprocess, sys
from pathlib import Path

import pytest
import torch

import hub_standins as hs
from llora import adapters as la
from llora.adapters import (PROVENANCE, merge_adapters, read_adapter, random_adapters, llora_merge, merge_parser,
                            data_free_methods)
from llora.core import OfflineError, save_tensors
from llora.fusion import fuse
from llora.task_vectors import TaskVector

REPO = Path(__file__).resolve().parents[1]


# --- tiny models and adapters ---------------------------------------------------------------------------------------
def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16)).eval()


def peft_adapter(folder, seed, r=4, alpha=8, **kw):
    "A peft LoRA adapter of `tiny_bert()` with random A and B (as after training); returns (folder, peft model)."
    from peft import LoraConfig, get_peft_model
    base = tiny_bert()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"], init_lora_weights=False, **kw)
    m = get_peft_model(base, cfg).eval()
    m.save_pretrained(folder)
    return Path(folder), m


def peft_delta(model, module):
    "ΔW of `module` as peft computes it (independent of llora's config reading)."
    return model.base_model.model.get_submodule(module).get_delta_weight("default").detach().double()


MODULES = [f"encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]


def write_adapter(folder, A, B, r=1, alpha=1, base="base/model", **config):
    "An adapter folder from hand-made factors: module -> A (r, in), module -> B (out, r)."
    from peft import LoraConfig
    folder = Path(folder); folder.mkdir(parents=True)
    save_tensors({**{f"base_model.model.{m}.lora_A.weight": a for m, a in A.items()},
                  **{f"base_model.model.{m}.lora_B.weight": b for m, b in B.items()}}, folder/"adapter_model.safetensors")
    LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted({m.rsplit(".", 1)[-1] for m in A}),
               base_model_name_or_path=base, **config).save_pretrained(str(folder))
    return folder


def delta64(a, m):
    "ΔW = s·B·A of module `m` of a `LoraAdapter`, computed in float64."
    return a.scale[m] * (a.B[m].double() @ a.A[m].double())


def layer_delta(out_dir):
    "module -> ΔW (float64) of a written adapter."
    a = read_adapter(out_dir)
    return {m: delta64(a, m) for m in a.A}


def nothing_left(parent, names=("out",)):
    "No output folder and no temporary sibling under `parent`."
    left = [p.name for p in Path(parent).iterdir() if any(p.name == n or p.name.startswith(f".{n}.") for n in names)]
    assert not left, left


# --- the merged adapter in plain peft equals the dense merge ----------------------------------------------------------
def test_merged_adapter_loads_in_plain_peft_and_equals_dense_merge(tmp_path):
    from peft import PeftModel
    # different ranks per layer (rank_pattern) and per adapter, plus an alpha_pattern: ranks differ per output layer
    a1, m1 = peft_adapter(tmp_path/"a1", seed=1, r=4, alpha=8)
    a2, m2 = peft_adapter(tmp_path/"a2", seed=2, r=4, alpha=8, rank_pattern={"value": 2}, alpha_pattern={"query": 2})
    a3, m3 = peft_adapter(tmp_path/"a3", seed=3, r=3, alpha=6)
    lam = 0.7
    out = merge_adapters([a1, a2, a3], tmp_path/"out", method="task_arithmetic", scaling=lam)
    expected = {m: lam * sum(peft_delta(p, m) for p in (m1, m2, m3)) for m in MODULES}
    prov = json.loads((out/PROVENANCE).read_text())
    ranks = {m: prov["layers"][m]["rank"] for m in MODULES}
    assert ranks == {m: (4 + 4 + 3 if m.endswith("query") else 4 + 2 + 3) for m in MODULES}
    cfg = json.loads((out/"adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]  # alpha = r: s = 1 in every layer

    loaded = PeftModel.from_pretrained(tiny_bert(), out).eval()
    for m in MODULES:  # weights: peft's own ΔW of the loaded adapter
        layer = loaded.base_model.model.get_submodule(m)
        assert layer.r["default"] == ranks[m] and layer.scaling["default"] == 1.0
        torch.testing.assert_close(peft_delta(loaded, m), expected[m], rtol=1e-5, atol=1e-6)
    dense = tiny_bert()
    with torch.no_grad():
        for m in MODULES: dense.get_submodule(m).weight += expected[m].float()
    x = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).last_hidden_state, dense(input_ids=x).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        merged_sd = loaded.merge_and_unload().state_dict()
    for m in MODULES: torch.testing.assert_close(merged_sd[m + ".weight"], dense.state_dict()[m + ".weight"])
    assert [i["weights_sha256"] for i in prov["inputs"]] and prov["hparams"] == {"scaling": lam}


def test_rslora_and_patterns_read_as_peft_scales_them(tmp_path):
    a, m = peft_adapter(tmp_path/"a", seed=4, r=4, alpha=8, use_rslora=True)
    b, n = peft_adapter(tmp_path/"b", seed=5, r=4, alpha=8, rank_pattern={"layer.1.attention.self.query": 3},
                        alpha_pattern={"value": 5})
    for path, model in ((a, m), (b, n)):
        ad = read_adapter(path)
        for mod in MODULES:
            torch.testing.assert_close(ad.delta_w(mod).double(), peft_delta(model, mod), rtol=1e-6, atol=1e-7)
    assert read_adapter(a).scale[MODULES[0]] == 8 / math.sqrt(4)
    assert read_adapter(b).A["encoder.layer.1.attention.self.query"].shape[0] == 3


def test_dense_out_is_base_plus_merged_delta(tmp_path):
    from transformers import BertModel
    a1, m1 = peft_adapter(tmp_path/"a1", seed=1)
    a2, m2 = peft_adapter(tmp_path/"a2", seed=2)
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge_adapters([a1, a2], tmp_path/"out", scaling=0.5, dense_out=tmp_path/"dense", base_model=base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base model is not modified
    sd = BertModel.from_pretrained(tmp_path/"dense").state_dict()
    for m in MODULES:
        want = before[m + ".weight"].double() + 0.5 * (peft_delta(m1, m) + peft_delta(m2, m))
        torch.testing.assert_close(sd[m + ".weight"].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(sd["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])


# --- rank ---------------------------------------------------------------------------------------------------------
def test_shared_a_adapters_stay_rank_r(tmp_path):
    srcs = random_adapters(tmp_path/"in", n=5, r=4, d=24, layers=2, shared_a=True)
    for method, hp in (("task_arithmetic", {"scaling": 0.3}), ("simple_average", {})):
        out = merge_adapters(srcs, tmp_path/method, method=method, **hp)
        a = read_adapter(out)
        assert {t.shape[0] for t in a.A.values()} == {4}
        ads = [read_adapter(s) for s in srcs]
        c = 0.3 if method == "task_arithmetic" else 1 / 5
        for m in a.A:
            torch.testing.assert_close(a.delta_w(m).double(), c * sum(delta64(x, m) for x in ads),
                                       rtol=1e-5, atol=1e-7)
    # independent A: the exact rank is the sum of the ranks
    srcs = random_adapters(tmp_path/"in2", n=3, r=4, d=24, layers=1)
    assert {t.shape[0] for t in read_adapter(merge_adapters(srcs, tmp_path/"ind")).A.values()} == {12}


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_attains_the_eckart_young_optimum(tmp_path, k):
    srcs = random_adapters(tmp_path/"in", n=3, r=4, d=20, layers=2)
    ads = [read_adapter(s) for s in srcs]
    out = merge_adapters(srcs, tmp_path/"out", scaling=1.0, rank=k)
    prov = json.loads((out/PROVENANCE).read_text())
    got = layer_delta(out)
    for m, dw in got.items():
        full = sum(delta64(a, m) for a in ads)
        s = torch.linalg.svdvals(full)
        optimum = float(s[k:].pow(2).sum().sqrt())  # the smallest ‖full − X‖_F over rank-k X
        assert got[m].shape and torch.linalg.matrix_rank(dw) == k
        assert abs(float(torch.linalg.matrix_norm(full - dw)) - optimum) < 1e-5 * float(s[0])
        assert abs(prov["layers"][m]["rel_error"] - optimum / float(s.pow(2).sum().sqrt())) < 1e-9
        assert prov["layers"][m]["numerical_rank"] == 12


# --- semantics ------------------------------------------------------------------------------------------------------
def hand_made(tmp_path, shared):
    "Two r=1 adapters of one 2×2 layer: A1 = e1ᵀ, A2 = e2ᵀ (or both e1ᵀ), B1 = e1, B2 = e2; init A0 = B0 = 0 rows."
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    m = "enc.q"
    A2 = e1 if shared else e2
    a = write_adapter(tmp_path/"a", {m: e1}, {m: e1.T.clone()})
    b = write_adapter(tmp_path/"b", {m: A2}, {m: e2.T.clone()})
    return m, a, b, e1, A2


def test_factor_and_delta_w_semantics_differ_on_a_hand_made_case(tmp_path):
    m, a, b, e1, e2 = hand_made(tmp_path, shared=False)
    init = write_adapter(tmp_path/"init", {m: torch.zeros(1, 2)}, {m: torch.zeros(2, 1)})
    dw = layer_delta(merge_adapters([a, b], tmp_path/"dw", method="simple_average"))[m]
    fac = layer_delta(merge_adapters([a, b], tmp_path/"fac", method="simple_average", space="factor", init=init))[m]
    torch.testing.assert_close(dw, torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64))  # mean of B_i A_i
    torch.testing.assert_close(fac, torch.full((2, 2), 0.25, dtype=torch.float64))  # mean(B) · mean(A): cross terms
    assert json.loads((tmp_path/"fac"/PROVENANCE).read_text())["layers"][m]["rank"] == 1


def test_factor_and_delta_w_agree_for_shared_a(tmp_path):
    m, a, b, e1, _ = hand_made(tmp_path, shared=True)
    for method, hp in (("task_arithmetic", {"scaling": 0.6}), ("simple_average", {})):
        dw = layer_delta(merge_adapters([a, b], tmp_path/f"dw_{method}", method=method, **hp))[m]
        fac = layer_delta(merge_adapters([a, b], tmp_path/f"fac_{method}", method=method, space="factor", **hp))[m]
        torch.testing.assert_close(dw, fac)
    srcs = random_adapters(tmp_path/"in", n=4, r=3, d=12, layers=2, shared_a=True)
    dw, fac = (layer_delta(merge_adapters(srcs, tmp_path/s, space=s, scaling=0.4)) for s in ("delta_w", "factor"))
    for mod in dw: torch.testing.assert_close(dw[mod], fac[mod], rtol=1e-5, atol=1e-8)


def test_ties_in_delta_w_space_is_fuse_on_each_layer(tmp_path):
    srcs = random_adapters(tmp_path/"in", n=3, r=2, d=10, layers=2)
    ads = [read_adapter(s) for s in srcs]
    got = layer_delta(merge_adapters(srcs, tmp_path/"out", method="ties", k=0.3, scaling=0.8))
    for m, dw in got.items():
        want = fuse("ties", [TaskVector({"w": delta64(a, m)}) for a in ads], k=0.3, scaling=0.8)["w"]
        torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-7)


def test_bin_weights_and_hub_ids_from_the_cache(tmp_path, monkeypatch):
    a, _ = peft_adapter(tmp_path/"a", seed=1)
    b = tmp_path/"b"; b.mkdir()
    (b/"adapter_config.json").write_text((a/"adapter_config.json").read_text())
    sd = {f"base_model.model.{m}.lora_{x}.weight": getattr(read_adapter(a), x)[m] for m in MODULES for x in "AB"}
    torch.save(sd, b/"adapter_model.bin")
    torch.testing.assert_close(layer_delta(merge_adapters([b], tmp_path/"from_bin"))[MODULES[0]],
                               layer_delta(merge_adapters([a], tmp_path/"from_st"))[MODULES[0]])
    cache = tmp_path/"hub"
    hs.add_to_hub_cache(cache, "someone/lora-a", a)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache)); monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.testing.assert_close(layer_delta(merge_adapters(["someone/lora-a"], tmp_path/"from_hub"))[MODULES[0]],
                               layer_delta(tmp_path/"from_st")[MODULES[0]])
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"): merge_adapters(["someone/missing"], tmp_path/"x")
    nothing_left(tmp_path, ("x",))


def test_pickled_bin_is_never_unpickled(tmp_path):
    a, _ = peft_adapter(tmp_path/"a", seed=1)
    b = tmp_path/"b"; b.mkdir()
    (b/"adapter_config.json").write_text((a/"adapter_config.json").read_text())

    class Evil:
        def __reduce__(self): return (os.system, (f"touch {tmp_path/'pwned'}",))
    torch.save({"x": Evil()}, b/"adapter_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"): merge_adapters([b], tmp_path/"out")
    assert not (tmp_path/"pwned").exists()
    nothing_left(tmp_path)


# --- command line ---------------------------------------------------------------------------------------------------
def test_console_script_is_registered():
    cfg = configparser.ConfigParser(); cfg.read(REPO/"settings.ini")
    scripts = dict(s.split("=", 1) for s in cfg["DEFAULT"]["console_scripts"].split())
    assert scripts["llora-merge"] == "llora.adapters:llora_merge"
    help_text = merge_parser().format_help()
    for name, hps in data_free_methods().items():  # every data-free method and its hyperparameters, from the registry
        assert f"  {name}:" in help_text and all(f"--{h} (default" in help_text for h in hps)
    assert "lorahub" in help_text.split("not data-free")[1]


def test_cli_end_to_end_equals_the_api(tmp_path):
    srcs = random_adapters(tmp_path/"in", n=3, r=2, d=12, layers=2)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "LLORA_PROGRESS": "0"}
    cmd = [sys.executable, "-c", "from llora.adapters import llora_merge; llora_merge()", *map(str, srcs),
           "--out", str(tmp_path/"cli"), "--method", "ties", "--k", "0.5", "--scaling", "0.9", "--rank", "3",
           "--sign-tie", "positive"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("cli")
    api = merge_adapters(srcs, tmp_path/"api", method="ties", k=0.5, scaling=0.9, rank=3, sign_tie="positive")
    cli, ref = read_adapter(tmp_path/"cli"), read_adapter(api)
    assert all(torch.equal(cli.A[m], ref.A[m]) and torch.equal(cli.B[m], ref.B[m]) for m in ref.A)
    prov = json.loads((tmp_path/"cli"/PROVENANCE).read_text())
    assert prov["hparams"] == {"k": 0.5, "scaling": 0.9, "sign_tie": "positive"} and prov["rank"] == 3
    bad = subprocess.run(cmd[:3] + [str(srcs[0]), "--out", str(tmp_path/"bad"), "--method", "ties", "--k", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "k (fraction of entries kept) must be in (0, 1]" in bad.stderr
    nothing_left(tmp_path, ("bad",))


def test_cli_in_process_weights_list_and_errors(tmp_path, capsys):
    srcs = random_adapters(tmp_path/"in", n=2, r=2, d=8, layers=1)
    out = llora_merge([*map(str, srcs), "--out", str(tmp_path/"o"), "--method", "ties", "--weights", "1,0.5", "--k", "1"])
    assert json.loads((out/PROVENANCE).read_text())["hparams"] == {"weights": [1, 0.5], "k": 1}
    for argv, msg in ((["--rank", "0"], "positive integer"), (["--method", "lorahub"], "invalid choice"),
                      (["--method", "simple_average", "--scaling", "2"], "unknown hyperparameter(s) scaling")):
        with pytest.raises(SystemExit) as e: llora_merge([*map(str, srcs), "--out", str(tmp_path/"e"), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    nothing_left(tmp_path, ("e",))


# --- every error path writes nothing --------------------------------------------------------------------------------
def _edit_config(folder, **changes):
    p = Path(folder)/"adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def _bad_inputs(tmp_path, case):
    "Adapter lists for each bad input, and the expected error."
    srcs = random_adapters(tmp_path/"in", n=2, r=2, d=8, layers=1)
    other = random_adapters(tmp_path/"other", n=1, r=2, d=8, layers=1)[0]
    kw = {}
    if case == "base model": _edit_config(other, base_model_name_or_path="google/flan-t5-base"); ins = [srcs[0], other]
    elif case == "modules":
        ins = [srcs[0], random_adapters(tmp_path/"o2", n=1, r=2, d=8, layers=1, targets=("q_proj", "k_proj"))[0]]
    elif case == "shapes": ins = [srcs[0], random_adapters(tmp_path/"o3", n=1, r=2, d=10, layers=1)[0]]
    elif case == "ranks": _edit_config(other, r=3); ins = [srcs[0], other]
    elif case == "method": ins, kw = srcs, dict(method="average")
    elif case == "data method": ins, kw = srcs, dict(method="lorahub")
    elif case == "hparam": ins, kw = srcs, dict(method="ties", density=0.5)
    elif case == "hparam value": ins, kw = srcs, dict(method="ties", k=0)
    elif case == "weights length": ins, kw = srcs, dict(method="ties", weights=[1.0])
    elif case == "rank": ins, kw = srcs, dict(rank=0)
    elif case == "space": ins, kw = srcs, dict(space="dw")
    elif case == "no config": (other/"adapter_config.json").unlink(); ins = [srcs[0], other]
    elif case == "no weights": (other/"adapter_model.safetensors").unlink(); ins = [srcs[0], other]
    elif case == "no folder": ins = [srcs[0], tmp_path/"nowhere"]
    elif case == "dora": _edit_config(other, use_dora=True); ins = [srcs[0], other]
    elif case == "not lora": _edit_config(other, peft_type="IA3"); ins = [srcs[0], other]
    elif case == "factor without A0": ins, kw = srcs, dict(space="factor")
    elif case == "factor ranks":
        ins = [srcs[0], random_adapters(tmp_path/"o4", n=1, r=3, d=8, layers=1)[0]]; kw = dict(space="factor", init=srcs[1])
    elif case == "init outside factor": ins, kw = srcs, dict(init=srcs[0])
    elif case == "out is input": ins, kw = srcs, dict(out=srcs[0])
    elif case == "dense_out without base": _edit_config(srcs[0], base_model_name_or_path=None); _edit_config(
        srcs[1], base_model_name_or_path=None); ins, kw = srcs, dict(dense_out=tmp_path/"dense")
    elif case == "dense_out wrong base": ins, kw = srcs, dict(dense_out=tmp_path/"dense", base_model=tiny_bert())
    return ins, kw


ERRORS = {"base model": "different base models", "modules": "adapt different modules", "shapes": "incompatible shapes",
          "ranks": "stores rank 2 but adapter_config.json gives r=3", "method": "not a data-free fusion method; valid",
          "data method": "(it needs data)", "hparam": "unknown hyperparameter(s) density",
          "hparam value": "must be in (0, 1]", "weights length": "1 weights for 2", "rank": "positive integer",
          "space": "space must be one of", "no config": "adapter_config.json missing", "no weights": "neither",
          "no folder": "no such folder", "dora": "DoRA", "not lora": "peft_type", "factor without A0": "pass init=",
          "factor ranks": "needs one rank and one scale per layer",
          "init outside factor": "only used with space='factor'", "out is input": "is one of the input adapters",
          "dense_out without base": "dense_out needs the base model",
          "dense_out wrong base": "has no weight 'vision_model.encoder.layers.0.self_attn.q_proj.weight'"}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_error_is_clear_and_writes_nothing(tmp_path, case):
    ins, kw = _bad_inputs(tmp_path, case)
    out = kw.pop("out", tmp_path/"out")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises((ValueError, FileNotFoundError)) as e: merge_adapters(ins, out, **kw)
    assert ERRORS[case] in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no dense, no temporary folders


def test_existing_output_is_kept_unless_overwrite_and_failures_keep_it(tmp_path, monkeypatch):
    srcs = random_adapters(tmp_path/"in", n=2, r=2, d=8, layers=1)
    out = merge_adapters(srcs, tmp_path/"out", scaling=1.0)
    first = (out/"adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"): merge_adapters(srcs, out, scaling=0.5)

    def broken(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(la, "atomic_write_text", broken)  # fails after the weights were written to the temp folder
    with pytest.raises(OSError, match="disk full"): merge_adapters(srcs, out, scaling=0.5, overwrite=True)
    assert (out/"adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    monkeypatch.undo()
    merge_adapters(srcs, out, scaling=0.5, overwrite=True)
    assert (out/"adapter_model.safetensors").read_bytes() != first
