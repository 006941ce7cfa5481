"""The data pipeline (`llora.data`): per-example inputs equal the batched reference transforms, the input cache is
keyed, verified and atomic, workers change nothing, training decodes lazily."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from llora import data as D
from llora.evaluate import evaluate
from llora.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, get_model, to_pil
from llora.tasks import Task
from llora.train import prepare, resolve_hparams, train

TEXTS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece that I will gladly watch again.", 1),
         ("Dull.", 0), ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0),
         ("Great cast, great story, great music.", 1), ("Bad.", 0), ("Good fun for the whole family.", 1)]
SENT = Task("t-data-sent", classes=["negative", "positive"], label_descriptions=["a negative review", "a positive review"],
            loader=lambda task, split: [{"text": t, "label": l} for t, l in TEXTS])
_rng = np.random.default_rng(0)
PICTURES = [{"image": Image.fromarray(_rng.integers(0, 255, (30 + 3 * i, 44 - 2 * i, 3), dtype=np.uint8)), "label": i % 3}
            for i in range(10)]
SHAPES = Task("t-data-shapes", classes=["circle", "square", "triangle"], templates=["a photo of a {c}."],
              modality="image", loader=lambda task, split: list(PICTURES))


@pytest.fixture
def file_backed(monkeypatch, tmp_path):
    "Make `loader` count as file-backed (cached on disk) in a scratch LLORA_CACHE."
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path))
    monkeypatch.delenv("LLORA_INPUT_CACHE", raising=False)
    def use(task):
        monkeypatch.setattr(D, "FILE_LOADERS", D.FILE_LOADERS + (task.loader,))
        return task
    return use


def test_text_batches_equal_the_batched_tokenizer():
    "Per-example token ids, padded by `collate`, equal the tokenizer's own batch (padding=True), pairs included."
    m = get_model("minilm-l6", tiny=True, max_length=8)
    ex = [{"text": t, "label": l, "text_pair": t[::-1]} for t, l in TEXTS]
    ref = m.tokenizer([e["text"] for e in ex], [e["text_pair"] for e in ex], padding=True, truncation=True,
                      max_length=8, return_tensors="pt")
    b = m.preprocess(SENT, ex)
    assert set(b) == {*ref, "label"}
    for k in ref: assert torch.equal(b[k], ref[k]), k
    assert b["label"].dtype == torch.long and b["label"].tolist() == [l for _, l in TEXTS]


def test_t5_batches_equal_the_batched_tokenizer():
    "T5: prompts padded with the pad id, targets with -100, as the tokenizer's batch with padding masked."
    m = get_model("flan-t5-base", tiny=True)
    task = Task("t-data-t5", classes=["negative", "positive"], loader=lambda t, s: [])
    ex = [{"text": t, "label": l} for t, l in TEXTS]
    b = m.preprocess(task, ex)
    enc = m.tokenizer([e["text"] for e in ex], padding=True, truncation=True, max_length=m.max_length, return_tensors="pt")
    lab = m.tokenizer([task.classes[l] for _, l in TEXTS], padding=True, return_tensors="pt")
    assert torch.equal(b["input_ids"], enc["input_ids"]) and torch.equal(b["attention_mask"], enc["attention_mask"])
    assert torch.equal(b["labels"], lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100))


@pytest.mark.parametrize("name", ["clip-vit-b-16-hf", "clip-vit-b-16-openclip"])
@pytest.mark.parametrize("paper_exact", [False, True])
def test_clip_pixels_equal_the_float_transform(name, paper_exact):
    "uint8 pixels, then `clip_normalize`, equal torchvision's ToTensor (+ Normalize) pipeline to the bit."
    from torchvision import transforms as T
    m = get_model(name, tiny=True, paper_exact=paper_exact)
    s = m.image_size
    ref_tf = (T.Compose([to_pil, T.Resize((s, s)), T.ToTensor()]) if paper_exact else
              T.Compose([to_pil, T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s), T.ToTensor(),
                         T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]))
    item = m.example_inputs(SHAPES, PICTURES[0])
    assert item["pixel_values"].dtype == torch.uint8 and tuple(item["pixel_values"].shape) == (3, s, s)
    b = m.preprocess(SHAPES, PICTURES)
    assert torch.equal(b["pixel_values"], torch.stack([ref_tf(e["image"]) for e in PICTURES]))


def test_store_keeps_every_input_and_reference(file_backed):
    file_backed(SENT)
    m = get_model("minilm-l6", tiny=True)
    store = D.split_inputs(m, SENT, "test")
    assert isinstance(store.arrays["input_ids"], np.memmap)
    assert store.refs == [l for _, l in TEXTS] and len(store) == len(TEXTS)
    for i, e in enumerate(SENT.load("test")):
        item = m.example_inputs(SENT, e)
        assert set(store[i]) == set(item) and all(torch.equal(store[i][k], v) for k, v in item.items())
    assert store.lengths() == [len(m.example_inputs(SENT, e)["input_ids"]) for e in SENT.load("test")]


def test_second_call_reads_the_cache(file_backed, monkeypatch):
    "Encoded once: a fresh model object reads the folder, encoding only the two examples the key checks."
    file_backed(SHAPES)
    D.split_inputs(get_model("clip-vit-b-16-hf", tiny=True), SHAPES, "test")
    m = get_model("clip-vit-b-16-hf", tiny=True)
    calls = []
    enc = m.example_inputs
    monkeypatch.setattr(m, "example_inputs", lambda task, e: calls.append(1) or enc(task, e))
    store = D.split_inputs(m, SHAPES, "test")
    assert len(calls) == 2 and len(store) == len(PICTURES)
    assert len(folders()) == 1


def test_key_separates_what_changes_the_inputs(file_backed):
    "Another max_length, preprocessing, sample or split is another folder."
    file_backed(SENT)
    D.split_inputs(get_model("minilm-l6", tiny=True), SENT, "test")
    D.split_inputs(get_model("minilm-l6", tiny=True, max_length=4), SENT, "test")
    D.split_inputs(get_model("minilm-l6", tiny=True), SENT, "test", max_examples=4)
    D.split_inputs(get_model("minilm-l6", tiny=True), SENT, "validation")
    assert len(folders()) == 4
    short = D.split_inputs(get_model("minilm-l6", tiny=True, max_length=4), SENT, "test")
    assert max(short.lengths()) == 4


def test_cache_off_and_in_memory_tasks_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path))
    m = get_model("minilm-l6", tiny=True)
    D.split_inputs(m, SENT, "test")  # a loader of no file: in memory
    monkeypatch.setattr(D, "FILE_LOADERS", D.FILE_LOADERS + (SENT.loader,))
    monkeypatch.setenv("LLORA_INPUT_CACHE", "0")
    store = D.split_inputs(m, SENT, "test")
    assert not isinstance(store.arrays["input_ids"], np.memmap)
    assert not folders()


def test_corrupt_cache_is_rebuilt_with_a_warning(file_backed):
    file_backed(SENT)
    m = get_model("minilm-l6", tiny=True)
    D.split_inputs(m, SENT, "test")
    folder, = folders()
    f = folder / "input_ids.bin"
    f.write_bytes(f.read_bytes()[:-3])  # a truncated file
    with pytest.warns(UserWarning, match="Re-encoding"): store = D.split_inputs(m, SENT, "test")
    assert store.refs == [l for _, l in TEXTS] and torch.equal(store[1]["input_ids"], m.example_inputs(SENT, SENT.load("test")[1])["input_ids"])


def test_failed_encoding_leaves_no_folder(file_backed, monkeypatch):
    "An error in the middle of encoding (a broken image, a kill) leaves no cache folder behind."
    file_backed(SHAPES)
    m = get_model("clip-vit-b-16-hf", tiny=True)
    enc, seen = m.example_inputs, []
    def broken(task, e):
        seen.append(1)
        if len(seen) == 6: raise OSError("broken image file")
        return enc(task, e)
    monkeypatch.setattr(m, "example_inputs", broken)
    with pytest.raises(OSError, match="broken image"): D.split_inputs(m, SHAPES, "test")
    assert [p.name for p in D.cache_dir("inputs").iterdir() if not p.name.endswith(".lock")] == []


def test_workers_change_nothing(file_backed):
    "A store encoded by 2 worker processes equals one encoded in this process, example for example."
    m = get_model("clip-vit-b-16-hf", tiny=True)
    a = D.split_inputs(m, SHAPES, "test", workers=0)
    b = D.split_inputs(m, SHAPES, "test", workers=2)
    assert a.refs == b.refs and all(torch.equal(a[i][k], b[i][k]) for i in range(len(a)) for k in a[i])


def test_bad_workers():
    with pytest.raises(ValueError, match="workers must be"): D.loader_workers("cpu", -1)
    assert D.loader_workers("cpu") == 0 and D.loader_workers("cuda", 3) == 3


def test_evaluate_same_scores_from_the_cache(file_backed, monkeypatch):
    "Scores equal with the disk cache, from a fresh model reading it, and without it."
    file_backed(SENT)
    cached = evaluate(prepare("minilm-l6", "lora", tiny=True), [SENT], batch_size=3)
    again = evaluate(prepare("minilm-l6", "lora", tiny=True), [SENT], batch_size=3)
    monkeypatch.setenv("LLORA_INPUT_CACHE", "0")
    plain = evaluate(prepare("minilm-l6", "lora", tiny=True), [SENT], batch_size=3)
    assert cached.equals(again) and cached.equals(plain)


def folders() -> list:
    "The cached splits (lock files beside them left out)."
    return [p for p in D.cache_dir("inputs").iterdir() if p.is_dir() and not p.name.startswith(".")]


class CountingView:
    "A list-like view that counts how many examples were decoded."
    def __init__(self, items): self.items, self.decoded = items, 0
    def __len__(self): return len(self.items)
    def __getitem__(self, i): self.decoded += 1; return self.items[i]


def test_training_decodes_only_what_it_trains_on():
    "train() no longer decodes the whole split first: 2 steps of 3 decode 6 of 40 examples."
    m = prepare("minilm-l6", "lora", tiny=True)
    view = CountingView([{"text": f"example number {i}", "label": i % 2} for i in range(40)])
    train(m, SENT, resolve_hparams("tiny", "lora", steps=2, batch_size=3), examples=view, device="cpu", workers=0)
    assert view.decoded == 6


def test_training_with_workers_is_bit_identical():
    "The sampler fixes the batches; worker processes only encode them: same parameters to the bit."
    out = []
    for w in (0, 2):
        m = prepare("minilm-l6", "lora", tiny=True)
        train(m, SENT, resolve_hparams("tiny", "lora", steps=3, batch_size=4), seed=0, device="cpu", workers=w)
        out.append(m.trainable_state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
