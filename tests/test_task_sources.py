"The 14 paper tasks through every on-disk source (tiny stand-ins from `data_standins`), the sampler, and error paths."
import os
os.environ["HF_HUB_OFFLINE"] = "1"  # before `datasets` is imported: it reads the variable once
import shutil, sys, time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import data_standins as S
from llora.core import OfflineError
from llora.tasks import (SOURCE_KINDS, DataNotFoundError, ExampleView, find_copy, get_task, list_tasks, sample_examples,
                         task_sources)

PAPER = list_tasks("vision") + list_tasks("glue")
CASES = [(src, t) for src in S.WRITERS for t in PAPER if S.applies(src, t)]
FOUND_AS = {"save_to_disk_splits": "save_to_disk", "glue_tsv_msr": "glue_tsv"}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLORA_DATA", raising=False)
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path_factory.getbasetemp() / "llora-cache"))


@pytest.fixture(scope="session")
def roots(tmp_path_factory):
    "source -> a data root holding stand-ins of every task it applies to (written on first use)."
    made = {}
    def get(src):
        if src not in made:
            made[src] = S.write_sources(tmp_path_factory.mktemp(src), [t for t in PAPER if S.applies(src, t)], src)
        return made[src]
    return get


def expected_sizes(task, found):
    "Split sizes the stand-in should give, from how many examples per class it wrote."
    if task.group == "glue":
        n_train, n_test = (48, 18) if task.kind == "regression" else (8 * task.n_classes, 3 * task.n_classes)
        va = min(round(0.1 * n_train), 1000)
        return {"train": n_train - va, "validation": va, "test": n_test}
    tr, own_val, te = (k * task.n_classes for k in S.per_class(task))
    if found in ("class_folders",) or (found == "torchvision" and task.name in ("EuroSAT", "SUN397")):
        total = tr + te
        te = round(0.2 * total); tr = total - te
        va = round(0.1 * tr)
        return {"train": tr - va, "validation": va, "test": te}
    if own_val and (found == "torchvision" or found == "image_folder") and task.name == "DTD":
        return {"train": tr, "validation": own_val, "test": te}
    va = round(0.1 * tr)
    return {"train": tr - va, "validation": va, "test": te}


@pytest.mark.parametrize("src,name", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_loader_through_source(src, name, roots):
    root, task = roots(src), get_task(name)
    copy = find_copy(task, root)
    assert copy.source == FOUND_AS.get(src, src)
    splits = {s: task.load(s, root=root) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == expected_sizes(task, copy.source)
    if splits["train"].base is splits["validation"].base:  # a hold-out (else the copy's own validation split)
        assert not set(splits["train"].indices) & set(splits["validation"].indices)
    for s, view in splits.items():
        labels = view.labels
        assert len(labels) == len(view)
        if task.kind == "regression": assert all(0 <= v <= 5 for v in labels)
        else: assert all(0 <= v < task.n_classes for v in labels)
        for i in range(0, len(view), max(1, len(view) // 12)):  # a dozen examples per split, decoded
            ex = view[i]
            assert ex["label"] == labels[i]
            if task.modality == "image":
                assert ex["image"].mode == "RGB" and S.true_label(ex) == ex["label"]  # mapped by name
            elif task.kind == "regression":
                assert ex["target"] == f"{ex['label']:.1f}" and float(S.stated_answer(ex)) == pytest.approx(ex["label"], abs=0.01)
            else:
                assert S.stated_answer(ex) == ex["target"] == task.classes[ex["label"]]
                assert ex["input"] == task.format_input(ex)
    if task.modality != "image":  # every class present in test
        assert task.kind == "regression" or set(splits["test"].labels) == set(range(task.n_classes))


def test_standins_fast_and_deterministic(tmp_path):
    t0 = time.time()
    a = S.write_sources(tmp_path / "a", PAPER, "parquet")
    b = S.write_sources(tmp_path / "b", PAPER, "parquet")
    assert time.time() - t0 < 20
    fa = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    assert len(fa) == 2 * len(list_tasks("vision")) + 3 * len(list_tasks("glue"))  # train/test; + validation for GLUE
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def test_hub_cache_read_by_real_load_dataset(roots):
    "The stand-in hub cache is what `datasets.load_dataset` finds offline, with or without a config."
    import datasets
    assert datasets.config.HF_HUB_OFFLINE
    root = str(roots("hub_cache"))
    cola = datasets.load_dataset("nyu-mll/glue", "cola", split="validation", cache_dir=root)
    assert len(cola) == 6 and cola.features["label"].names == ["unacceptable", "acceptable"]
    dtd = datasets.load_dataset("tanganke/dtd", cache_dir=root)
    assert set(dtd) == {"train", "test"} and len(dtd["test"]) == 2 * 47
    svhn = datasets.load_dataset("ufldl-stanford/svhn", "cropped_digits", split="train", cache_dir=root)
    assert len(svhn) == 40


def test_source_override(roots):
    root = roots("hub_cache")
    task = get_task("glue-rte")
    assert find_copy(task, root, source="hub_cache").source == "hub_cache"
    with pytest.raises(DataNotFoundError) as e: find_copy(task, root, source="glue_tsv")
    assert "glue_data/RTE" in str(e.value) and "- glue_tsv:" in str(e.value)
    with pytest.raises(ValueError, match="does not apply"): find_copy(task, root, source="torchvision")


@pytest.mark.parametrize("name", ["SUN397", "glue-mnli"])
def test_nothing_found_lists_every_place(name, tmp_path):
    task = get_task(name)
    t0 = time.time()
    with pytest.raises(OfflineError) as e: task.load("test", root=tmp_path)
    assert time.time() - t0 < 1
    msg = str(e.value)
    for kind in task_sources(task): assert f"- {kind}: " + SOURCE_KINDS[kind].layout(task) in msg
    assert str(tmp_path) in msg and "root=" in msg and "LLORA_DATA" in msg and "data_root" in msg
    assert "HF_HUB_OFFLINE is set" in msg and task.options["hub"][0] in msg
    with pytest.raises(OfflineError, match="does not exist"): task.load("test", root=tmp_path / "missing")


def test_class_count_mismatch(tmp_path):
    root = S.write_sources(tmp_path, ["EuroSAT"], "image_folder")
    (root / "EuroSAT" / "test" / "Volcano").mkdir()
    shutil.copy(next((root / "EuroSAT" / "test" / "Forest").iterdir()), root / "EuroSAT" / "test" / "Volcano" / "x.png")
    with pytest.raises(ValueError, match=r"11 classes but task 'EuroSAT' has 10.*Volcano"):
        get_task("EuroSAT").load("test", root=root)
    assert len(get_task("EuroSAT").load("train", root=root)) == 36  # the train folder is fine


def test_labels_out_of_range(tmp_path):
    root = S.write_sources(tmp_path, ["glue-cola"], "csv")
    f = root / "cola" / "validation.csv"
    f.write_text(f.read_text().replace(",1,", ",7,", 1))
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0\.\.1"): get_task("glue-cola").load("test", root=root)


# ---- the sampler ----------------------------------------------------------------------------------------------------
def _proportional(labels, sample, n):
    full, got = Counter(labels), Counter(sample)
    return all(abs(got[c] - n * k / len(labels)) < 1 for c, k in full.items())


@pytest.mark.parametrize("n", [1, 7, 30, 95])
def test_sampler_properties(n, roots):
    task = get_task("GTSRB")
    view = task.load("test", root=roots("image_folder"))  # 86 images, sorted by class folder
    s = sample_examples(task, view, n, seed=0)
    assert len(s) == min(n, len(view)) and len(set(s.indices)) == len(s) and set(s.indices) <= set(view.indices)
    assert s.indices == sample_examples(task, view, n, seed=0).indices
    if n < len(view):
        assert _proportional(view.labels, s.labels, n)
        assert s.indices != sample_examples(task, view, n, seed=1).indices


def test_sampler_never_decodes(roots):
    task = get_task("SUN397")
    view = task.load("train", root=roots("parquet"))
    class Raises:
        def __len__(self): return len(view.base)
        def __getitem__(self, i): raise AssertionError("an image was decoded")
    blind = ExampleView(Raises(), view.indices, view.transform, view.base_labels)
    s = sample_examples(task, blind, 100, seed=3)
    assert len(s) == 100 and _proportional(blind.labels, s.labels, 100)
    assert s.labels == sample_examples(task, view, 100, seed=3).labels


def test_sampler_datasets_and_regression(roots):
    import datasets
    ds = datasets.load_from_disk(str(roots("save_to_disk") / "glue-qqp"))["train"]
    s = sample_examples(get_task("glue-qqp"), ds, 5, seed=0)
    assert isinstance(s, datasets.Dataset) and len(s) == 5 and sorted(Counter(s["label"]).values()) == [2, 3]
    stsb = get_task("glue-stsb")
    view = stsb.load("train", root=roots("glue_tsv"))
    s = sample_examples(stsb, view, 12, seed=0)
    assert len(s) == 12 and _proportional([round(v) for v in view.labels], [round(v) for v in s.labels], 12)
    with pytest.raises(ValueError, match="n must be"): sample_examples(stsb, view, -1)


def test_evaluate_samples_instead_of_first_n(roots, monkeypatch, tmp_path):
    "`evaluate`'s `max_examples` draws a stratified sample (the inputs `llora.data.split_inputs` encodes): every class of a class-sorted copy is represented."
    from llora.data import split_inputs
    from llora.models import get_model
    monkeypatch.setenv("LLORA_DATA", str(roots("image_folder")))
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path))
    task = get_task("EuroSAT")  # test: 2 images per class, sorted by class
    assert sorted(task.load("test").labels[:10]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # what the first 10 were
    m = get_model("clip-vit-b-16-hf", tiny=True)
    refs = split_inputs(m, task, "test", 10).refs
    assert sorted(refs) == list(range(10))
    assert refs == split_inputs(get_model("clip-vit-b-16-hf", tiny=True), task, "test", 10).refs  # the same, from the cache


def test_unreachable_hub_for_data_fails_fast_naming_data_root(monkeypatch, tmp_path):
    "Issue 12: without HF_HUB_OFFLINE, no local copy and no hub: one refused request, then a clear error (not datasets' retries)."
    import huggingface_hub.constants as hc
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LLORA_DATA"): monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    for name in ("glue-rte", "SVHN"):
        t0 = time.time()
        with pytest.raises(OfflineError, match="cannot be reached") as e: get_task(name).load("test")
        msg = str(e.value)
        assert time.time() - t0 < 5 and "data_root" in msg and "LLORA_DATA" in msg and "root=" in msg, msg
