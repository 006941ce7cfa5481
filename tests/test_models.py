"Property and regression tests of `llora.models` (fast, CPU, offline)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llora.core import OfflineError
from llora.models import (MODELS, SplitMultiheadAttention, fuse_attention, get_model, register_model,
                          split_attention, class_texts, ModelSpec)

PAPER = ("clip-vit-b-16-openclip", "clip-vit-b-32-openclip", "clip-vit-l-14-openclip", "clip-vit-b-16-hf",
         "flan-t5-base")
SENT = SimpleNamespace(name="t-sentiment", kind="classification", classes=["negative", "positive"],
                       label_descriptions=["a negative movie review", "a positive movie review"],
                       templates=["{}", "this is {}."], metric="accuracy")
TEXTS = [{"text": "An awful, boring film. I hated every minute.", "label": 0},
         {"text": "A wonderful, moving masterpiece; I loved it.", "label": 1},
         {"text": "Dull plot, terrible acting, a complete waste of time.", "label": 0},
         {"text": "Brilliant and funny, the best movie of the year!", "label": 1}]
SHAPES = SimpleNamespace(name="t-shapes", kind="classification", classes=["circle", "square", "triangle"],
                         templates=["a photo of a {}."], metric="accuracy")
IMAGES = [{"image": torch.rand(3, 36, 40), "label": i % 3} for i in range(4)]
RTE = SimpleNamespace(name="t-rte", kind="classification", classes=["entailment", "not_entailment"],
                      format_input=lambda e: f"{e['premise']} Question: does this imply that {e['hypothesis']}?")
PAIRS = [{"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
         {"premise": "It rains.", "hypothesis": "It is dry.", "label": 1}]


def data_for(model):
    if model.family == "sentence-encoder": return SENT, TEXTS
    if model.family == "t5": return RTE, PAIRS
    return SHAPES, IMAGES


def test_registry_names():
    assert {"minilm-l6", *PAPER} <= set(MODELS)
    assert all(isinstance(s, ModelSpec) and s.family and s.description for s in MODELS.values())


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="minilm-l6"): get_model("nope")


def test_register_model_decorator():
    @register_model("tmp-test-model", family="x")
    def build(tiny=False, **kw): return get_model("minilm-l6", tiny=True, **kw)
    try: assert get_model("tmp-test-model", max_length=8).max_length == 8
    finally: MODELS.pop("tmp-test-model")


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("lora", [False, True])
def test_tiny_end_to_end(name, lora):
    "preprocess -> loss -> backward -> one optimizer step -> predict, for full and LoRA fine-tuning."
    m = get_model(name, tiny=True)
    if lora: m.add_lora()
    task, ex = data_for(m)
    batch = m.preprocess(task, ex)
    m.train()
    loss = m.loss(task, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    before = {k: v.clone() for k, v in m.trainable_state_dict().items()}
    torch.optim.SGD(trainable, lr=1e-2).step()
    assert any(not torch.equal(before[k], v) for k, v in m.trainable_state_dict().items())
    pred = m.predict(task, batch)
    assert pred.dtype == torch.long and pred.shape == (len(ex),)
    assert m.training  # predict restores the mode
    if lora: assert all("lora_" in k for k in m.trainable_state_dict())
    else: assert len(m.trainable_state_dict()) == len(list(m.backbone.parameters()))


def test_predict_then_loss_backward():
    "A head first built inside predict (inference mode) is still usable for training."
    m = get_model("minilm-l6", tiny=True)
    b = m.preprocess(SENT, TEXTS)
    m.predict(SENT, b)
    m.loss(SENT, b).backward()


def test_minilm_real_zero_shot():
    m = get_model("minilm-l6")
    assert m.logit_scale == 20.0 and m.max_length == 64
    assert m.predict_examples(SENT, TEXTS, batch_size=3).tolist() == [e["label"] for e in TEXTS]
    topics = SimpleNamespace(name="t-topic", kind="classification", classes=["sports", "finance", "cooking"],
                             label_descriptions=["a news article about sports", "a news article about finance",
                                                 "a news article about cooking"], templates=["{}"])
    ex = [{"text": "The striker scored twice as the home team won the cup final.", "label": 0},
          {"text": "Shares fell 3% after the central bank raised interest rates.", "label": 1},
          {"text": "Whisk the eggs with sugar, then fold in the flour and bake for 20 minutes.", "label": 2}]
    assert m.predict_examples(topics, ex).tolist() == [0, 1, 2]


def test_minilm_truncates_to_max_length():
    m = get_model("minilm-l6", tiny=True, max_length=16)
    b = m.preprocess(SENT, [{"text": "word " * 200, "label": 0}])
    assert b["input_ids"].shape[1] == 16


def test_heads_use_pretrained_encoder():
    "Changing (fine-tuning) the backbone never changes a task's head."
    m = get_model("minilm-l6", tiny=True)
    h0 = m.head(SENT).clone()
    m._heads.clear()
    with torch.no_grad():
        for p in m.backbone.parameters(): p.add_(torch.randn_like(p))
    assert torch.equal(m.head(SENT), h0)


def test_frozen_parts_hidden_but_moved():
    m = get_model("clip-vit-b-16-hf", tiny=True)
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    assert sum(p.numel() for p in m.parameters()) == n_backbone
    assert all(k.startswith("backbone.") for k in m.state_dict())
    m.double()
    assert next(m.frozen["clip"].parameters()).dtype == torch.float64
    b = m.preprocess(SHAPES, IMAGES)
    b["pixel_values"] = b["pixel_values"].double()
    assert m.logits(SHAPES, b).dtype == torch.float64


def test_tiny_builds_are_deterministic():
    for name in ("minilm-l6", "clip-vit-b-16-openclip", "clip-vit-b-16-hf", "flan-t5-base"):
        a, b = get_model(name, tiny=True).state_dict(), get_model(name, tiny=True).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        c = get_model(name, tiny=True, init_seed=1).state_dict()
        assert not all(torch.equal(a[k], c[k]) for k in a), name


@pytest.mark.parametrize("name", ["minilm-l6", "clip-vit-b-16-openclip", "clip-vit-b-16-hf", "flan-t5-base"])
def test_same_seed_same_A0(name):
    def a0(m): return {k: v for k, v in m.trainable_state_dict().items() if "lora_A" in k}
    torch.manual_seed(123); r0 = torch.rand(3)
    torch.manual_seed(123)
    m1 = get_model(name, tiny=True).add_lora(seed=42)
    assert torch.equal(torch.rand(3), r0)  # the caller's RNG stream is untouched
    m2 = get_model(name, tiny=True).add_lora(seed=42)
    m3 = get_model(name, tiny=True).add_lora(seed=7)
    assert a0(m1) and all(torch.equal(v, a0(m2)[k]) for k, v in a0(m1).items())
    assert not any(torch.equal(v, a0(m3)[k]) for k, v in a0(m1).items())
    assert all(not v.any() for k, v in m1.trainable_state_dict().items() if "lora_B" in k)


def _lora_modules(m):
    return sorted({k.split(".lora_")[0].split(".")[-1] for k in m.trainable_state_dict()})


@pytest.mark.parametrize("name,targets,count", [
    ("minilm-l6", ["query", "value"], 2 * 2 * 16 * (32 + 32)),  # layers × (q, v) × r × (d_in + d_out)
    ("clip-vit-b-16-openclip", ["q_proj", "v_proj"], 2 * 2 * 16 * (32 + 32)),
    ("clip-vit-b-16-hf", ["q_proj", "v_proj"], 2 * 2 * 16 * (32 + 32)),
    ("flan-t5-base", ["q", "v"], (2 + 2 * 2) * 2 * 16 * (32 + 32)),  # enc self + dec (self, cross)
])
def test_lora_placement_and_count(name, targets, count):
    m = get_model(name, tiny=True).add_lora()
    assert m.lora_targets == targets and _lora_modules(m) == targets
    assert sum(v.numel() for v in m.trainable_state_dict().values()) == count
    assert m.lora_config.r == 16 and m.lora_config.lora_alpha == 32 and m.lora_config.lora_dropout == 0.1


@pytest.mark.parametrize("name", ["clip-vit-b-16-openclip", "clip-vit-b-16-hf"])
def test_paper_exact_clip(name):
    m = get_model(name, tiny=True, paper_exact=True).add_lora()
    assert _lora_modules(m) == ["q_proj"]
    assert sum(v.numel() for v in m.trainable_state_dict().values()) == 2 * 16 * (32 + 32)
    x = m.preprocess(SHAPES, IMAGES)["pixel_values"]
    assert x.min() >= 0 and x.max() <= 1  # no mean/std normalization


@pytest.mark.parametrize("name", ["clip-vit-b-16-openclip", "clip-vit-b-16-hf"])
def test_paper_exact_clip_heads_use_the_authors_template(name):
    "The authors build every zero-shot head from one template; the default model uses the task's ensemble."
    from llora.tasks import PAPER_TEMPLATE, get_task
    task = get_task("EuroSAT")
    exact, default = get_model(name, tiny=True, paper_exact=True), get_model(name, tiny=True)
    assert exact.head_templates == [PAPER_TEMPLATE] and default.head_templates is None
    texts = class_texts(task, exact.head_templates)
    assert [len(t) for t in texts] == [1] * task.n_classes
    assert texts[0] == [PAPER_TEMPLATE.format(c=task.label_descriptions[0])]
    assert len(class_texts(task)[0]) == len(task.templates) > 1
    assert not torch.allclose(exact.head(task), default.head(task))


def test_real_size_hf_clip_q_only_count():
    "The paper's Table 3: 294K trainable parameters for q_proj-only LoRA on ViT-B/16 (random weights, offline)."
    m = get_model("clip-vit-b-16-hf", pretrained=False, paper_exact=True).add_lora()
    assert sum(v.numel() for v in m.trainable_state_dict().values()) == 12 * 16 * (768 + 768) == 294_912


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_mha(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=batch_first).eval()
    split = SplitMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(3, 7, 24) if batch_first else torch.randn(7, 3, 24)
    masks = [{}, {"attn_mask": torch.randn(7, 7)}, {"attn_mask": torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)},
             {"attn_mask": torch.randn(9, 7, 7)}, {"key_padding_mask": torch.rand(3, 7) > 0.7}]
    masks[-1]["key_padding_mask"][:, 0] = False
    for kw in masks:
        torch.testing.assert_close(split(x, x, x, **kw)[0], mha(x, x, x, need_weights=False, **kw)[0])
    torch.testing.assert_close(split.to_mha()(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])


def test_split_and_fuse_roundtrip():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    sd = {k: v.clone() for k, v in seq.state_dict().items()}
    assert split_attention(seq) == 1 and isinstance(seq[1], SplitMultiheadAttention)
    assert fuse_attention(seq) == 1 and isinstance(seq[1], nn.MultiheadAttention)
    assert all(torch.equal(sd[k], v) for k, v in seq.state_dict().items())


def test_openclip_qv_lora_touches_only_q_and_v():
    "Split attention + LoRA == fused MHA with in_proj_weight + [s B_q A_q; 0; s B_v A_v]."
    import open_clip
    from llora.models import TINY_OPENCLIP, _seeded, _quiet_root_logger
    m = get_model("clip-vit-b-16-openclip", tiny=True).add_lora(r=4, alpha=8, dropout=0.0)
    with _seeded(0), _quiet_root_logger(): ref = open_clip.create_model(TINY_OPENCLIP, pretrained=None, force_quick_gelu=True).eval()
    d = 32
    for i in range(2):
        attn = m.backbone.base_model.model.transformer.resblocks[i].attn
        with torch.no_grad():
            for lin in (attn.q_proj, attn.v_proj):
                lin.lora_B.default.weight.normal_(); lin.lora_A.default.weight.normal_()
        dw = lambda lin: lin.scaling["default"] * lin.lora_B.default.weight @ lin.lora_A.default.weight
        blk = ref.visual.transformer.resblocks[i].attn
        with torch.no_grad():
            blk.in_proj_weight += torch.cat([dw(attn.q_proj), torch.zeros(d, d), dw(attn.v_proj)])
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(m.backbone(x), ref.encode_image(x), rtol=1e-4, atol=1e-5)
    m.train(); m.zero_grad()
    m.loss(SHAPES, m.preprocess(SHAPES, IMAGES)).backward()
    grads = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert {k.split(".lora_")[0].split(".")[-1] for k in grads} == {"q_proj", "v_proj"}


def test_t5_text2text_and_classification_mapping():
    m = get_model("flan-t5-base", tiny=True, max_new_tokens=4)
    b = m.preprocess(RTE, PAIRS)
    assert (b["labels"] == -100).any() and b["label"].tolist() == [0, 1]
    m.generate = lambda batch, **kw: ["entailment", "Not_Entailment "][:len(batch["input_ids"])]
    assert m.predict(RTE, b).tolist() == [0, 1]  # answers are stripped and lower-cased
    m.generate = lambda batch, **kw: ["entailment", "maybe"]
    assert m.predict(RTE, b).tolist() == [0, -1]
    stsb = SimpleNamespace(name="t-stsb", kind="regression", format_target=lambda e: f"{e['label']:.1f}")
    b = m.preprocess(stsb, [{"text": "a b", "label": 3.2}])
    assert b["label"].dtype == torch.float32 and m.predict(stsb, b) == ["entailment", "maybe"]


def test_encoder_rejects_text2text_task():
    m = get_model("minilm-l6", tiny=True)
    t = SimpleNamespace(name="t", kind="text2text", classes=["a"])
    with pytest.raises(ValueError, match="text2text"): m.logits(t, m.preprocess(SENT, TEXTS))


@pytest.mark.parametrize("name", PAPER)
def test_paper_models_offline_error_fast(name, monkeypatch, tmp_path):
    "An EMPTY hub cache, offline: every paper model fails at once, naming the cache and the parameter to change."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(OfflineError, match="pretrained=") as e: get_model(name)
    assert str(tmp_path) in str(e.value)
    assert time.time() - t0 < 10


def test_class_texts_average_templates():
    t = SimpleNamespace(name="x", classes=["a", "b"], label_descriptions=[["alpha", "ay"], "bee"],
                        templates=["{}", "it is {}"])
    assert class_texts(t) == [["alpha", "it is alpha", "ay", "it is ay"], ["bee", "it is bee"]]


def test_lora_model_linearizes():
    "The models' LoRA layers are plain peft lora.Linear layers, so llora.linearize handles all of them."
    lin = pytest.importorskip("llora.linearize")
    for name in ("minilm-l6", "clip-vit-b-16-openclip", "clip-vit-b-16-hf", "flan-t5-base"):
        m = get_model(name, tiny=True).add_lora(dropout=0.0)
        task, ex = data_for(m)
        b = m.preprocess(task, ex)
        m.eval()
        with torch.no_grad(): before = m.loss(task, b)
        lin.linearize_lora(m)
        with torch.no_grad(): after = m.loss(task, b)
        torch.testing.assert_close(after, before)
        m.train(); m.loss(task, b).backward()
        for k, p in m.named_parameters():
            if "lora_A" in k and p.requires_grad: assert p.grad is None or not p.grad.any(), k


def test_with_llora_tasks_text2text():
    "A GLUE-style llora.tasks.Task (prompt, text targets) through the tiny T5: targets encoded, strings predicted."
    tasks = pytest.importorskip("llora.tasks")
    t = tasks.Task("t-cola", kind="text2text", classes=["unacceptable", "acceptable"], prompt="cola sentence: {sentence}",
                   metric="exact_match")
    m = get_model("flan-t5-base", tiny=True, max_new_tokens=3)
    ex = [{"sentence": "The cat sat.", "label": 1}, {"sentence": "Cat the sat on.", "label": 0}]
    b = m.preprocess(t, ex)
    assert m.tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) == "cola sentence: The cat sat."
    labels = b["labels"].masked_fill(b["labels"] == -100, 0)
    assert m.tokenizer.batch_decode(labels, skip_special_tokens=True) == ["acceptable", "unacceptable"]
    preds = m.predict(t, b)
    assert isinstance(preds, list) and len(preds) == 2 and all(isinstance(p, str) for p in preds)
    assert 0 <= t.score(preds, [t.format_target(e) for e in ex]) <= 1


def test_column_dict_examples():
    "A sliced `datasets.Dataset` (a dict of columns) is accepted like a list of examples."
    m = get_model("minilm-l6", tiny=True)
    cols = {"text": [e["text"] for e in TEXTS], "label": [e["label"] for e in TEXTS]}
    b1, b2 = m.preprocess(SENT, cols), m.preprocess(SENT, TEXTS)
    assert all(torch.equal(b1[k], b2[k]) for k in b2)
    assert m.predict_examples(SENT, cols, batch_size=3).shape == (4,)


@pytest.mark.parametrize("name", ["minilm-l6", "clip-vit-b-16-openclip", "clip-vit-b-16-hf"])
def test_deepcopy_shares_frozen_parts(name):
    import copy
    m = get_model(name, tiny=True)
    task, ex = data_for(m)
    b = m.preprocess(task, ex)
    h = m.head(task)
    c = copy.deepcopy(m)
    assert all(c.frozen[k] is v for k, v in m.frozen.items())
    assert c.head(task) is h  # the cache is shared too
    assert not any(p is q for p, q in zip(c.parameters(), m.parameters()))
    c.add_lora()
    assert m.lora_config is None and not any("lora_" in k for k in m.state_dict())
    c.double()
    assert all(next(v.parameters()).dtype == torch.float32 for v in m.frozen.values())
    assert all(next(v.parameters()).dtype == torch.float64 for v in c.frozen.values())
    b64 = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
    assert c.logits(task, b64).dtype == torch.float64 and m.logits(task, b).dtype == torch.float32
