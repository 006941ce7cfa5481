"Property and regression tests of `llora.train` (tiny configurations, fast, CPU, offline)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")
import json, warnings

import pytest
import torch

from llora.tasks import Task
from llora.train import (MODES, PRESETS, base_model, checkpoint_dir, finetune, load_finetuned, load_meta,
                         load_trainable, lr_factor, prepare, resolve_hparams, theta0)

PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
         ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1),
         ("I fell asleep halfway through.", 0), ("The best film of the year.", 1)]
EXAMPLES = [{"text": t, "label": l} for t, l in PAIRS]
TOY = Task("toy-sentiment", classes=["negative", "positive"],
           label_descriptions=["a negative movie review", "a positive movie review"],
           loader=lambda task, split: list(EXAMPLES))
TINY = dict(preset="tiny", steps=4, tiny=True, lr=1e-2)


def backbone_params(name):
    return {n for n, _ in base_model(name, tiny=True).named_parameters() if n.startswith("backbone.")}


def test_presets_and_modes():
    assert MODES == ("full", "lora", "l_lora", "ntk", "linear_only", "linear_only_bias", "linear_all", "linear_all_bias",
                     "ia3", "l_ia3")
    assert {"clip-paper", "flan-t5-paper", "embedded", "tiny"} <= set(PRESETS)
    clip = resolve_hparams("clip-paper", "lora")
    assert (clip["optimizer"], clip["lr"], clip["weight_decay"], clip["scheduler"], clip["warmup_steps"],
            clip["steps"], clip["batch_size"]) == ("adamw", 1e-5, 0.1, "cosine", 600, 6000, 64)
    t5 = resolve_hparams("flan-t5-paper", "l_lora")
    assert (t5["optimizer"], t5["weight_decay"], t5["steps"], t5["batch_size"]) == ("adam", 0.0, 2000, 16)
    assert 1e-5 <= t5["lr"] <= 4e-5
    emb = resolve_hparams("embedded", "full")
    assert emb["max_length"] <= 64
    with pytest.raises(ValueError, match="valid modes"): resolve_hparams("tiny", "qlora")
    with pytest.raises(ValueError, match="Unknown preset"): resolve_hparams("nope", "lora")


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError): lr_factor(50, 100, 0, "step")


@pytest.mark.parametrize("name", ["minilm-l6", "clip-vit-b-16-hf", "clip-vit-b-16-openclip", "flan-t5-base"])
def test_prepare_trainable_parameters(name):
    full = backbone_params(name)
    for mode in MODES:
        if mode in ("ntk", "l_ia3") and name == "flan-t5-base":
            with pytest.raises(ValueError, match=mode): prepare(name, mode, tiny=True)
            continue
        m = prepare(name, mode, tiny=True)
        names = set(m.trainable_state_dict())
        assert names == set(theta0(m)), (name, mode)
        assert all(torch.equal(v, theta0(m)[k]) for k, v in m.trainable_state_dict().items())
        if mode == "full": assert names == full
        elif mode == "ntk": assert names == {n.replace("backbone.", "backbone.model.", 1) for n in full}
        elif mode == "lora":
            assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
            assert any(".lora_A." in n for n in names)
        elif mode == "l_lora": assert names and all(".lora_B." in n for n in names)
        elif mode in ("linear_only", "linear_all"):
            assert names < full and all(n.endswith("weight") for n in names)
        elif mode in ("linear_only_bias", "linear_all_bias"): assert names < full
        elif mode == "ia3": assert names and all(".ia3_l." in n for n in names)
        elif mode == "l_ia3": assert names and all(n.startswith("backbone.model.") and ".ia3_l." in n for n in names)
        assert m.llora_mode == mode


def test_lora_a0_shared_across_calls_and_seeded():
    a = lambda m: {k: v for k, v in theta0(m).items() if "lora_A" in k}
    m1, m2, m3 = prepare("minilm-l6", "lora", tiny=True), prepare("minilm-l6", "lora", tiny=True), \
        prepare("minilm-l6", "lora", tiny=True, seed=0)
    assert all(torch.equal(v, a(m2)[k]) for k, v in a(m1).items())
    assert not all(torch.equal(v, a(m3)[k]) for k, v in a(m1).items())


@pytest.mark.parametrize("name", ["minilm-l6", "clip-vit-b-16-hf"])
def test_l_lora_equals_lora_at_theta0(name):
    lora, llora = prepare(name, "lora", tiny=True).eval(), prepare(name, "l_lora", tiny=True).eval()
    if name == "minilm-l6": task, ex = TOY, EXAMPLES
    else:
        task = Task("toy-shapes", classes=["circle", "square"], templates=["a photo of a {c}."], modality="image",
                    loader=lambda t, s: [])
        ex = [{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), "label": i % 2}
              for i in range(4)]
    b = lora.preprocess(task, ex)
    with torch.no_grad(): torch.testing.assert_close(llora.logits(task, b), lora.logits(task, b))


def test_prepare_errors():
    with pytest.raises(ValueError, match="valid modes"): prepare("minilm-l6", "qlora", tiny=True)
    with pytest.raises(ValueError, match="Registered models"): prepare("no-such-model", "lora", tiny=True)
    with pytest.raises(ValueError, match="LoRA options"): prepare("minilm-l6", "full", tiny=True, r=4)
    with pytest.raises(ValueError, match="already prepared"): prepare(prepare("minilm-l6", "lora", tiny=True), "lora")


def test_finetune_deterministic_and_resumes(tmp_path):
    c1 = finetune("minilm-l6", TOY, "lora", out_dir=tmp_path / "a", **TINY)
    c2 = finetune("minilm-l6", TOY, "lora", out_dir=tmp_path / "b", **TINY)
    assert c1 == checkpoint_dir(tmp_path / "a", "minilm-l6", "lora", "toy-sentiment", tiny=True)
    s1, s2 = load_trainable(c1), load_trainable(c2)
    assert set(s1) == set(s2) == set(prepare("minilm-l6", "lora", tiny=True).trainable_state_dict())
    assert all(torch.equal(s1[k], s2[k]) for k in s1)                      # same seed -> same checkpoint
    assert not all(torch.equal(s1[k], theta0(prepare("minilm-l6", "lora", tiny=True))[k]) for k in s1)  # trained
    meta = load_meta(c1)
    assert meta["finished"] and meta["steps"] == 4 and len(meta["losses"]) == 4 and meta["seconds"] > 0
    mtime = (c1 / "trainable.safetensors").stat().st_mtime_ns
    assert finetune("minilm-l6", TOY, "lora", out_dir=tmp_path / "a", **TINY) == c1   # resumed, not retrained
    assert (c1 / "trainable.safetensors").stat().st_mtime_ns == mtime
    finetune("minilm-l6", TOY, "lora", out_dir=tmp_path / "a", resume=False, **TINY)  # forced retrain
    assert (c1 / "trainable.safetensors").stat().st_mtime_ns != mtime
    assert all(torch.equal(s1[k], load_trainable(c1)[k]) for k in s1)      # ... to the same result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune("minilm-l6", TOY, "lora", out_dir=tmp_path / "a", **{**TINY, "steps": 2})  # other config: retrained
    assert load_meta(c1)["steps"] == 2


def test_unfinished_run_is_redone(tmp_path):
    c = finetune("minilm-l6", TOY, "full", out_dir=tmp_path, **TINY)
    (c / "meta.json").unlink()          # as if killed before the end
    c2 = finetune("minilm-l6", TOY, "full", out_dir=tmp_path, **TINY)
    assert (c2 / "meta.json").exists()


def test_l_lora_checkpoint_is_a_peft_adapter(tmp_path):
    from peft import PeftModel
    ck = finetune("minilm-l6", TOY, "l_lora", out_dir=tmp_path, **TINY)
    assert json.loads((ck / "adapter" / "adapter_config.json").read_text())["r"] == 16
    ft = load_finetuned(ck).eval()
    plain = base_model("minilm-l6", tiny=True)
    plain.backbone = PeftModel.from_pretrained(plain.backbone, str(ck / "adapter")).eval()
    b = ft.preprocess(TOY, EXAMPLES)
    with torch.no_grad(): torch.testing.assert_close(plain.logits(TOY, b), ft.logits(TOY, b), atol=1e-5, rtol=1e-5)


def test_lora_checkpoint_is_a_peft_adapter(tmp_path):
    from peft import PeftModel
    ck = finetune("minilm-l6", TOY, "lora", out_dir=tmp_path, **TINY)
    ft = load_finetuned(ck).eval()
    plain = base_model("minilm-l6", tiny=True)
    plain.backbone = PeftModel.from_pretrained(plain.backbone, str(ck / "adapter")).eval()
    b = ft.preprocess(TOY, EXAMPLES)
    with torch.no_grad(): torch.testing.assert_close(plain.logits(TOY, b), ft.logits(TOY, b), atol=1e-5, rtol=1e-5)


def test_finetune_errors(tmp_path):
    with pytest.raises(ValueError, match="valid modes"): finetune("minilm-l6", TOY, "qlora", out_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="Unknown task"): finetune("minilm-l6", "no-such-task", "lora", out_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="Registered models"): finetune("nope", TOY, "lora", out_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="lrr"): finetune("minilm-l6", TOY, "lora", out_dir=tmp_path, lrr=1, **TINY)


def test_training_progress_reaches_a_non_terminal_stderr(capsys, monkeypatch):
    "Under papermill the kernel's stderr is no terminal: the step bar is still drawn unless LLORA_PROGRESS=0."
    from llora.train import train
    monkeypatch.delenv("LLORA_PROGRESS", raising=False)
    m = prepare("minilm-l6", "lora", tiny=True)
    train(m, TOY, resolve_hparams("tiny", "lora", steps=2, batch_size=2), device="cpu", desc="bar-check")
    assert "bar-check" in capsys.readouterr().err
    monkeypatch.setenv("LLORA_PROGRESS", "0")
    train(m, TOY, resolve_hparams("tiny", "lora", steps=2, batch_size=2), device="cpu", desc="bar-check")
    assert "bar-check" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["minilm-l6", "clip-vit-b-16-hf", "clip-vit-b-16-openclip", "flan-t5-base"])
def test_linear_only_ablation_selects_exactly_the_named_parameters(name):
    "Issue 17: the seed's Table 2 ablation — QKVO weights ⊂ + biases ⊂ all linear + biases; all linear adds MLP weights only."
    import re
    sets = {mode: set(prepare(name, mode, tiny=True).trainable_state_dict())
            for mode in ("linear_only", "linear_only_bias", "linear_all", "linear_all_bias")}
    qkvo, qkvo_b, every, every_b = (sets[m] for m in ("linear_only", "linear_only_bias", "linear_all", "linear_all_bias"))
    assert qkvo < every <= every_b and qkvo <= qkvo_b <= every_b
    assert all(n.endswith("weight") for n in qkvo | every)
    assert all(n.endswith("bias") for n in qkvo_b - qkvo) and all(n.endswith("bias") for n in every_b - every)
    mlp = re.compile(r"(intermediate\.dense|\.output\.dense|mlp\.(fc1|fc2|c_fc|c_proj)|DenseReluDense\.wi(_0|_1)?|DenseReluDense\.wo)\.weight$")
    assert (every - qkvo) and all(mlp.search(n) and "attention.output" not in n for n in every - qkvo), sorted(every - qkvo)[:4]
    assert not any(re.search(r"(embed|norm|LayerNorm|ln_|pooler|conv1|patch)", n) for n in every_b)
    if name == "flan-t5-base": assert qkvo_b == qkvo and every_b == every  # T5 has no biases
    else: assert qkvo_b - qkvo and every_b - every


def test_l_ia3_is_the_first_order_of_ia3_in_its_vectors():
    """At θ0 (IA)³ and L-(IA)³ are the base model; L-(IA)³'s backbone (what the wrapper expands: the head's pooling and
    normalization come after it) is affine in the (IA)³ vectors, twice the move giving twice the change, and agrees with
    (IA)³ to first order (a tiny move), while (IA)³ itself is not affine."""
    from llora.evaluate import applied
    (ia3, lin), base = (prepare("minilm-l6", m, tiny=True) for m in ("ia3", "l_ia3")), base_model("minilm-l6", tiny=True)
    batch = base.preprocess(TOY, EXAMPLES)
    def out(m):
        m.eval()
        with torch.no_grad():
            return m.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.double()
    for m in (ia3, lin): torch.testing.assert_close(out(m), out(base), rtol=1e-5, atol=1e-5)  # float32 outputs
    g = torch.Generator().manual_seed(0)
    tv_plain = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in theta0(ia3).items()}
    tv_lin = {k.replace("backbone.", "backbone.model.", 1): v for k, v in tv_plain.items()}
    assert set(tv_lin) == set(theta0(lin))
    def change(m, tv, s):
        with applied(m, tv, scaling=s): return out(m) - out(base)
    def curvature(m, tv):  # ‖f(2τ) − 2 f(τ) + f(0)‖ / ‖f(τ) − f(0)‖: 0 exactly when f is affine along τ
        return float((change(m, tv, 2.0) - 2 * change(m, tv, 1.0)).norm() / change(m, tv, 1.0).norm())
    flat, curved = curvature(lin, tv_lin), curvature(ia3, tv_plain)  # measured: about 1e-5 (float32 rounding) and 1e-2
    assert flat < 1e-4 and curved > 100 * flat, (flat, curved)
    torch.testing.assert_close(change(lin, tv_lin, 1e-3), change(ia3, tv_plain, 1e-3), rtol=1e-2, atol=1e-5)
