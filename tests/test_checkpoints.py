"Fault injection on fine-tuning checkpoints: truncation, bit flips, wrong model, concurrent writers, SIGKILL, determinism."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")
import hashlib, json, multiprocessing as mp, signal, struct, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

import llora.train as lt
from llora.core import atomic_dir, file_lock, save_tensors
from llora.tasks import Task
from llora.train import (CheckpointError, finetune, load_finetuned, load_meta, load_trainable, prepare, save_adapter,
                         verify_checkpoint)

PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
         ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1)]
EXAMPLES = [{"text": t, "label": l} for t, l in PAIRS]
TOY = Task("toy-sentiment", classes=["negative", "positive"],
           label_descriptions=["a negative movie review", "a positive movie review"],
           loader=lambda task, split: list(EXAMPLES))
TINY = dict(preset="tiny", steps=2, tiny=True, lr=1e-2)
FORK = mp.get_context("fork")  # for children that run no torch code
# children that train or save: a forked child of a process whose OpenMP pool has run can hang, so they start fresh
SPAWN = mp.get_context("spawn")


def run(out, mode="lora", **kw): return finetune("minilm-l6", TOY, mode, out_dir=out, **{**TINY, **kw})


def trained(ck):
    "A copy of the checkpoint's tensors (safetensors memory-maps the file, and the tests overwrite it in place)."
    return {k: v.clone() for k, v in load_trainable(ck).items()}


def tensors_equal(a, b): return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def retrain_warning(fn):
    "Run `fn`, return (its result, the text of the warnings it gave)."
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, " ".join(str(w.message) for w in ws)


def data_start(path):
    "Offset of the tensor data in a safetensors file (8-byte header length, then the JSON header)."
    return 8 + struct.unpack("<Q", Path(path).read_bytes()[:8])[0]


# --- truncation and corruption ---

def test_truncated_trainable_is_named_and_retrained(tmp_path):
    ck = run(tmp_path); good = trained(ck)
    f = ck / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trainable.safetensors") as e: load_trainable(ck)
    assert str(ck) in str(e.value) and "finetune" in str(e.value)          # names the file and how to recover
    with pytest.raises(CheckpointError, match="bytes, meta.json recorded"): verify_checkpoint(ck)
    ck2, msg = retrain_warning(lambda: run(tmp_path))                      # resume: not taken as finished
    assert ck2 == ck and "trainable.safetensors" in msg and "retraining" in msg
    assert tensors_equal(load_trainable(ck), good)


def test_bit_flip_is_detected_before_use(tmp_path):
    ck = run(tmp_path); good = trained(ck)
    f = ck / "trainable.safetensors"
    raw = bytearray(f.read_bytes()); i = data_start(f)
    raw[i:i + 4] = b"\xff\xff\xff\xff"                                      # the first float becomes NaN
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256") as e: load_trainable(ck)
    assert "trainable.safetensors" in str(e.value)
    _, msg = retrain_warning(lambda: run(tmp_path))
    assert "sha256" in msg and tensors_equal(load_trainable(ck), good)


def test_adapter_corruption_is_detected(tmp_path):
    ck = run(tmp_path)
    f = ck / "adapter" / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes()); raw[-1] ^= 0x40; f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"): verify_checkpoint(ck)


def test_truncated_meta_json_is_named_and_retrained(tmp_path):
    ck = run(tmp_path)
    m = ck / "meta.json"; m.write_text(m.read_text()[:40])
    with pytest.raises(CheckpointError, match="meta.json") as e: load_meta(ck)
    assert "finetune" in str(e.value)
    _, msg = retrain_warning(lambda: run(tmp_path))
    assert "meta.json" in msg and load_meta(ck)["finished"]


def test_missing_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No finished run"): load_meta(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="No finished run"): load_trainable(tmp_path / "nothing")


def old_format(ck):
    "Turn a checkpoint into the format written before the manifest (no `files`, no `format` in meta.json)."
    meta = json.loads((ck / "meta.json").read_text())
    for k in ("files", "format", "torch_threads"): meta.pop(k, None)
    (ck / "meta.json").write_text(json.dumps(meta))


def test_checkpoints_of_the_previous_format_stay_readable(tmp_path):
    ck = run(tmp_path); good = trained(ck); old_format(ck)
    assert tensors_equal(load_trainable(ck), good) and verify_checkpoint(ck)["config"]
    mtime = (ck / "trainable.safetensors").stat().st_mtime_ns
    assert run(tmp_path) == ck and (ck / "trainable.safetensors").stat().st_mtime_ns == mtime   # reused
    load_finetuned(ck)


def test_previous_format_with_nan_is_refused(tmp_path):
    ck = run(tmp_path); old_format(ck)
    f = ck / "trainable.safetensors"
    raw = bytearray(f.read_bytes()); i = data_start(f); raw[i:i + 4] = b"\x00\x00\xc0\x7f"   # NaN, no hash to catch it
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="NaN") as e: load_trainable(ck)
    assert "trainable.safetensors" in str(e.value)
    _, msg = retrain_warning(lambda: run(tmp_path))
    assert "NaN" in msg and torch.isfinite(next(iter(load_trainable(ck).values()))).all()


# --- the wrong model ---

def unchanged(model, fn):
    "Run `fn` (expected to raise) and check that it copied nothing into `model`."
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e: fn()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return str(e.value)


def test_lora_checkpoint_refuses_an_l_lora_model(tmp_path):
    ck = run(tmp_path, "lora")
    m = prepare("minilm-l6", "l_lora", tiny=True)
    msg = unchanged(m, lambda: load_finetuned(ck, m))
    assert "mode: checkpoint 'lora', model 'l_lora'" in msg, msg


def test_rank_mismatch_names_the_rank(tmp_path):
    ck = run(tmp_path, "lora", lora={"r": 4})
    m = prepare("minilm-l6", "lora", tiny=True, r=8)
    msg = unchanged(m, lambda: load_finetuned(ck, m))
    assert "r: checkpoint 4, model 8" in msg, msg


def test_targets_and_seed_mismatch(tmp_path):
    ck = run(tmp_path, "l_lora")
    m = prepare("minilm-l6", "l_lora", tiny=True, seed=0)                 # another A0: another function
    assert "seed: checkpoint 42, model 0" in unchanged(m, lambda: load_finetuned(ck, m))
    m = prepare("minilm-l6", "l_lora", tiny=True, targets=["query"])
    assert "target_modules" in unchanged(m, lambda: load_finetuned(ck, m))


def test_other_model_is_refused(tmp_path):
    ck = run(tmp_path, "full")
    m = prepare("clip-vit-b-16-hf", "full", tiny=True)
    assert "model: checkpoint 'minilm-l6', model 'clip-vit-b-16-hf'" in unchanged(m, lambda: load_finetuned(ck, m))


def test_text_preset_with_an_image_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="max_length") as e:
        finetune("clip-vit-b-16-hf", TOY, "lora", preset="embedded", tiny=True, out_dir=tmp_path)
    assert "clip-paper" in str(e.value) and "preset" in str(e.value)
    assert not any(tmp_path.iterdir())                                     # nothing trained, nothing written


# --- concurrent writers ---

def _save_many(folder, n, barrier):
    m = prepare("minilm-l6", "lora", tiny=True)
    barrier.wait()
    for _ in range(n): save_adapter(m, folder)


def test_concurrent_adapter_saves(tmp_path):
    old = os.umask(0o022)
    try:
        barrier = SPAWN.Barrier(4)
        ps = [SPAWN.Process(target=_save_many, args=(tmp_path / "adapter", 40, barrier)) for _ in range(4)]
        for p in ps: p.start()
        for p in ps: p.join(300)
    finally: os.umask(old)
    assert [p.exitcode for p in ps] == [0] * 4                             # no 'Directory not empty', no ENOENT
    a = tmp_path / "adapter"
    assert sorted(p.name for p in a.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert a.stat().st_mode & 0o777 == 0o755                               # the usual permissions, not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["adapter"]  # no temp left


def _finetune_into(out, barrier, q):
    "Write the same run many times (training stubbed out, so that the writes overlap), then resume it."
    lt.train = lambda m, *a, **k: dict(losses=[(0, 0.5)], seconds=0.0, main_process=True)
    barrier.wait()
    try:
        for _ in range(15): run(out, resume=False)
        q.put(("ok", str(run(out, resume=True))))
    except Exception as e: q.put(("error", repr(e)))


def test_concurrent_finetune_of_one_configuration(tmp_path):
    barrier, q = SPAWN.Barrier(4), SPAWN.Queue()
    ps = [SPAWN.Process(target=_finetune_into, args=(tmp_path, barrier, q)) for _ in range(4)]
    for p in ps: p.start()
    got = [q.get(timeout=300) for _ in ps]
    for p in ps: p.join(60)
    assert all(s == "ok" for s, _ in got), got
    assert len({c for _, c in got}) == 1                                   # every caller gets the one checkpoint
    ck = Path(got[0][1])
    verify_checkpoint(ck); load_finetuned(ck)


def test_file_lock_excludes_other_processes(tmp_path):
    def hold(path, ev, done):
        with file_lock(path): ev.set(); done.wait(10)
    ev, done = FORK.Event(), FORK.Event()
    p = FORK.Process(target=hold, args=(tmp_path / "x", ev, done)); p.start(); assert ev.wait(20)
    with pytest.raises(TimeoutError, match="x"):
        with file_lock(tmp_path / "x", timeout=0.2): pass
    done.set(); p.join(10)
    with file_lock(tmp_path / "x", timeout=5): pass                        # free again once the holder is gone


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    d = tmp_path / "d"; d.mkdir(); (d / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("new"); raise RuntimeError("killed")
    assert (d / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["d"]
    with atomic_dir(d) as tmp: (tmp / "b").write_text("new")
    assert sorted(p.name for p in d.iterdir()) == ["b"]


# --- SIGKILL mid-write ---

def _killed_while_writing(out):
    "Retrain the run and SIGKILL this process once the trainable file of the new checkpoint is written."
    real = lt.save_tensors
    def save_then_die(*a, **k):
        real(*a, **k); os.kill(os.getpid(), signal.SIGKILL)
    lt.save_tensors = save_then_die
    run(out, resume=False, lr=5e-2)


def test_sigkill_mid_write_keeps_the_complete_checkpoint(tmp_path):
    ck = run(tmp_path); good = trained(ck)
    p = SPAWN.Process(target=_killed_while_writing, args=(tmp_path,)); p.start(); p.join(300)
    assert p.exitcode == -signal.SIGKILL
    verify_checkpoint(ck)                                                  # the previous run, whole
    assert tensors_equal(load_trainable(ck), good)
    mtime = (ck / "meta.json").stat().st_mtime_ns
    assert run(tmp_path) == ck and (ck / "meta.json").stat().st_mtime_ns == mtime    # resume reuses it
    run(tmp_path, resume=False)                                            # a later write cleans the leftovers
    assert sorted(p.name for p in ck.parent.iterdir() if not p.name.endswith(".lock")) == [ck.name]


def test_sigkill_during_the_first_write_retrains(tmp_path):
    p = SPAWN.Process(target=_killed_while_writing, args=(tmp_path,)); p.start(); p.join(300)
    assert p.exitcode == -signal.SIGKILL
    ck = lt.checkpoint_dir(tmp_path, "minilm-l6", "lora", TOY.name, tiny=True)
    assert not ck.exists()                                                 # never a half checkpoint at the final path
    assert run(tmp_path) == ck and verify_checkpoint(ck)["finished"]


# --- determinism ---

def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    t = {"b": torch.arange(6.).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    md = {"model": "m", "mode": "lora", "task": "t", "format": "pt"}
    digests = {hashlib.sha256(save_tensors(t, tmp_path / f"{i}.safetensors", metadata=md).read_bytes()).hexdigest()
               for i in range(12)}
    assert len(digests) == 1                                               # safetensors alone orders metadata at random
    from safetensors import safe_open
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == md and torch.equal(f.get_tensor("b"), t["b"])


def test_same_seed_same_bytes_in_a_fresh_process(tmp_path):
    "Two fresh interpreters (other hash seeds) fine-tune the same run: byte-identical checkpoint files."
    code = ("import sys; from tests.test_checkpoints import run; run(sys.argv[1])")
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")], env=env, cwd=Path(__file__).parents[1])
    a = run(tmp_path / "a")
    assert child.wait(120) == 0
    b = lt.checkpoint_dir(tmp_path / "b", "minilm-l6", "lora", TOY.name, tiny=True)
    files = lambda c: {str(p.relative_to(c)): p.read_bytes() for p in c.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert files(a) == files(b) and len(files(a)) == 3
    assert load_meta(a)["files"] == load_meta(b)["files"]
    assert load_meta(a)["torch_threads"] == torch.get_num_threads()


def test_task_vectors_refuse_checkpoints_of_another_rank(tmp_path):
    "The sweep builds one θ0 model for all tasks: a task fine-tuned with another rank is named, not a torch error."
    from llora.evaluate import task_vectors
    run(tmp_path, "lora", lora={"r": 4})
    with pytest.raises(CheckpointError, match="r: checkpoint 4, model 8"):
        task_vectors(prepare("minilm-l6", "lora", tiny=True, r=8), "lora", [TOY.name], tmp_path, tiny=True)
