"Paper models built from hub-cache, local-folder and checkpoint-file stand-ins, offline (tests/hub_standins.py)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import copy, re, time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import hub_standins as hs
from llora.core import OfflineError
from llora.models import fuse_attention, get_model

SHAPES = SimpleNamespace(name="t-shapes", kind="classification", classes=["circle", "square"], templates=["a {}."])
IMAGES = [{"image": torch.rand(3, 36, 40), "label": i % 2} for i in range(3)]
SENT = SimpleNamespace(name="t-sent", kind="classification", classes=["negative", "positive"], templates=["{}"])
RTE = SimpleNamespace(name="t-rte", kind="classification", classes=["entailment", "not_entailment"],
                      format_input=lambda e: f"{e['premise']} Question: does this imply that {e['hypothesis']}?")
DATA = {"clip-hf": (SHAPES, IMAGES), "clip-openclip": (SHAPES, IMAGES),
        "sentence-encoder": (SENT, [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}]),
        "t5": (RTE, [{"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0}])}
WEIGHTS = {"clip-hf": "model.safetensors", "t5": "model.safetensors", "sentence-encoder": "model.safetensors",
           "clip-openclip": "open_clip_model.safetensors"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    return cache, hs.write_hub_cache(cache)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return hs.write_local_copies(tmp_path_factory.mktemp("local"))


@pytest.fixture
def offline(monkeypatch, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    return hub


def loaded_tensors(m) -> dict:
    "The model's pre-trained tensors under the names its checkpoint uses."
    if m.family == "clip-hf":
        return {**{f"vision_model.{k}": v for k, v in m.backbone.state_dict().items()}, **m.frozen["clip"].state_dict()}
    if m.family == "clip-openclip":
        visual = copy.deepcopy(m.backbone); fuse_attention(visual)
        return {**{f"visual.{k}": v for k, v in visual.state_dict().items()}, **m.frozen["clip"].state_dict()}
    return m.backbone.state_dict()


def assert_weights_equal(m, saved_file):
    saved, got = load_file(saved_file), loaded_tensors(m)
    assert saved and set(saved) <= set(got), sorted(set(saved) - set(got))[:5]
    for k, v in saved.items(): assert torch.equal(got[k].cpu(), v), k


def assert_predicts(m):
    task, ex = DATA[m.family]
    pred = m.predict(task, m.preprocess(task, ex))
    assert len(pred) == len(ex)


def test_hub_cache_layout(hub, tmp_path):
    "The cache is what huggingface_hub writes and reads: scan_cache_dir and try_to_load_from_cache accept it."
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    cache, ids = hub
    info = scan_cache_dir(cache)
    assert not info.warnings and {r.repo_id for r in info.repos} == set(hs.HUB_IDS.values())
    for repo in info.repos:
        (rev,) = repo.revisions
        assert rev.refs == {"main"} and rev.nb_files == repo.nb_files >= 2
    path = Path(try_to_load_from_cache("google/flan-t5-base", "model.safetensors", cache_dir=cache))
    assert path.is_symlink() and not os.path.isabs(os.readlink(path))  # snapshots/<commit>/f -> ../../blobs/<etag>
    import hashlib
    assert path.resolve().name == hashlib.sha256(path.read_bytes()).hexdigest()  # LFS files: etag = sha256
    cfg = Path(try_to_load_from_cache("google/flan-t5-base", "config.json", cache_dir=cache))
    data = cfg.read_bytes()
    assert cfg.resolve().name == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob sha1
    assert hs.write_hub_cache(tmp_path) == ids  # deterministic: the same files, blobs and commits
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in Path(cache).rglob("*") if p.is_file())


@pytest.mark.parametrize("name", sorted(hs.HUB_IDS))
def test_builds_offline_from_hub_cache(name, offline):
    cache, ids = offline
    m = get_model(name, pretrained=ids[name])
    assert_predicts(m)
    from huggingface_hub import try_to_load_from_cache
    assert_weights_equal(m, try_to_load_from_cache(hs.HUB_IDS[name], WEIGHTS[m.family], cache_dir=cache))


@pytest.mark.parametrize("name", sorted(hs.HUB_IDS))
def test_builds_from_local_folder(name, local, offline):
    m = get_model(name, pretrained=local[name])
    assert_predicts(m)
    assert_weights_equal(m, Path(local[name])/WEIGHTS[m.family])


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("name", hs.OPENCLIP)
def test_openclip_from_checkpoint_file(name, suffix, tmp_path, offline, local):
    path = hs.write_checkpoint_files(tmp_path, suffix)[name]
    m = get_model(name, tiny=True, pretrained=path)  # tiny: the architecture the file is read into
    assert_predicts(m)
    assert_weights_equal(m, Path(local[name])/"open_clip_model.safetensors")


class Payload:
    ran = False
    def __reduce__(self): return (_mark_ran, ())

def _mark_ran():
    Payload.ran = True
    return "payload"


def test_pickled_object_never_unpickled(tmp_path, offline):
    path = tmp_path/"evil.bin"
    torch.save({"visual.proj": torch.zeros(2), "x": Payload()}, path)
    Payload.ran = False
    with pytest.raises(ValueError, match="weights_only"): get_model("clip-vit-b-16-openclip", tiny=True, pretrained=str(path))
    assert not Payload.ran


def test_tag_route_reads_cached_weights_and_refuses_misfit(offline):
    "pretrained=True is open_clip's 'openai' tag: the cached weights are found, and tiny ones do not fit ViT-B-32."
    t0 = time.time()
    with pytest.raises(ValueError, match="does not fit open_clip's ViT-B-32"): get_model("clip-vit-b-32-openclip")
    assert time.time() - t0 < 30


def _drop_from_cache(cache, repo, filename):
    from huggingface_hub import try_to_load_from_cache
    os.unlink(try_to_load_from_cache(repo, filename, cache_dir=cache))  # the snapshot link: as if never downloaded


@pytest.mark.parametrize("name,filename,message", [
    ("flan-t5-base", "model.safetensors", "no weights file (model.safetensors or"),
    ("clip-vit-b-16-hf", "tokenizer.json", None),  # vocab.json + merges.txt still make a tokenizer
    ("clip-vit-b-16-openclip", "open_clip_model.safetensors", "no weights file (open_clip_model.safetensors or"),
    ("clip-vit-b-16-openclip", "open_clip_config.json", "no config file (open_clip_config.json)"),
])
def test_missing_file_offline(name, filename, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    ids = hs.write_hub_cache(tmp_path)
    _drop_from_cache(tmp_path, hs.HUB_IDS[name], filename)
    if message is None: return assert_predicts(get_model(name, pretrained=ids[name]))
    t0 = time.time()
    with pytest.raises(OfflineError, match=re.escape(message)) as e: get_model(name, pretrained=ids[name])
    assert time.time() - t0 < 5
    assert hs.HUB_IDS[name] in str(e.value) and "pretrained=<local folder>" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_bad_paths(tmp_path, local):
    with pytest.raises(FileNotFoundError, match="nope.*spiece.model"): get_model("flan-t5-base", pretrained=str(tmp_path/"nope"))
    broken = tmp_path/"t5"
    broken.mkdir()
    for f in Path(local["flan-t5-base"]).iterdir():
        if f.name not in ("tokenizer.json", "spiece.model"): (broken/f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"t5'?: the folder has no tokenizer file \(tokenizer.json or spiece.model\)"):
        get_model("flan-t5-base", pretrained=str(broken))
    with pytest.raises(NotADirectoryError, match="config.json"):
        get_model("clip-vit-b-16-hf", pretrained=str(Path(local["clip-vit-b-16-hf"])/"model.safetensors"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        get_model("clip-vit-b-16-openclip", pretrained=local["flan-t5-base"])


@pytest.mark.parametrize("name", ["clip-vit-b-16-openclip", "clip-vit-b-16-hf", "flan-t5-base", "minilm-l6"])
def test_pretrained_false_and_tiny_unchanged(name):
    a, b = get_model(name, tiny=True).state_dict(), get_model(name, tiny=True, pretrained=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["flan-t5-base", "clip-vit-b-16-hf", "clip-vit-b-16-openclip"])
def test_unreachable_hub_fails_fast_or_uses_cache(monkeypatch, tmp_path, hub, name):
    "Issue 12: without HF_HUB_OFFLINE and without a hub, one refused request decides: cache, or a clear error."
    import huggingface_hub.constants as hc
    monkeypatch.delenv("HF_HUB_OFFLINE"); monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # huggingface_hub read the variable at import
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(OfflineError, match="cannot be reached") as e: get_model(name)
    assert time.time() - t0 < 5 and "pretrained=<local folder>" in str(e.value)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    assert_predicts(get_model(name, pretrained=hub[1][name]))


def test_hf_clip_truncates_long_class_texts(local, offline):
    "A class text longer than the text tower's positions is cut, not an error (the stand-in reads 16 positions)."
    m = get_model("clip-vit-b-16-hf", pretrained=str(local["clip-vit-b-16-hf"]))
    emb = m.encode_text(["a centered satellite photo of " + "very " * 40 + "dense forest land", "a lake"])
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
