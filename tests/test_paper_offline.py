"""The paper path as a GPU user runs it, simulated on CPU: offline, every model and data set already copied.

Tiny random stand-ins of the three paper models sit in the Hugging Face hub cache (`tests/hub_standins.py`) and in
local folders; stand-ins of all 14 paper tasks sit in a data root, each task in another of the on-disk formats a real
download or copy has (`tests/data_standins.py`), and in the default `datasets` cache. Then the real command lines:
`papermill nbs/exp_finetune.ipynb ... -p profile paper` and `papermill nbs/exp_fusion.ipynb ... -p profile paper` with
tiny overrides (steps, examples, subsets), with HF_HUB_OFFLINE=1. exp_fusion must reuse exp_finetune's checkpoints.
"""
import json, os, subprocess, sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import data_standins as ds
import hub_standins as hs

ROOT = Path(__file__).resolve().parents[1]
VISION = ("Cars", "DTD", "EuroSAT", "GTSRB", "RESISC45", "SUN397", "SVHN")
GLUE = ("glue-cola", "glue-mnli", "glue-mrpc", "glue-qqp", "glue-rte", "glue-sst2", "glue-stsb")
# every task in another format of its real copies (a data root may mix them)
SOURCES = {"Cars": "torchvision", "DTD": "hub_cache", "EuroSAT": "image_folder", "GTSRB": "torchvision",
           "RESISC45": "class_folders", "SUN397": "save_to_disk", "SVHN": "torchvision",
           "glue-cola": "glue_tsv", "glue-mnli": "hub_cache", "glue-mrpc": "glue_tsv_msr", "glue-qqp": "parquet",
           "glue-rte": "csv", "glue-sst2": "save_to_disk_splits", "glue-stsb": "glue_tsv"}
TINY = ["-p", "steps", "2", "-p", "batch_size", "4"]  # training overrides: the same for both notebooks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "The user's machine: hub cache, local model folders, a data root, the default `datasets` cache; offline."
    base = tmp_path_factory.mktemp("paper-world")
    hub_ids = hs.write_hub_cache(base / "hf" / "hub")
    local = hs.write_local_copies(base / "models")
    for task, source in SOURCES.items(): ds.write_sources(base / "data", [task], source)
    ds.write_sources(base / "hf" / "datasets", VISION, "hub_cache")  # where `load_dataset` caches without cache_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LLORA_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(base / "hf"), LLORA_CACHE=str(base / "llora"),
               LLORA_PROGRESS="0", OMP_NUM_THREADS="1")
    return dict(base=base, hub_ids=hub_ids, local=local, data=base / "data", env=env)


def papermill(world, notebook, out_dir, *params):
    "Run `papermill nbs/<notebook>.ipynb OUT --cwd nbs -p ...` as a user would; return the executed notebook."
    out = Path(out_dir) / f"{notebook}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", f"nbs/{notebook}.ipynb", str(out), "--cwd", "nbs",
           "-p", "profile", "paper", "-r", "out_dir", str(out_dir), *params]
    r = subprocess.run(cmd, cwd=ROOT, env=world["env"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return nbformat.read(out, as_version=4)


def checkpoint_stamps(ckpt):
    "Checkpoint folder -> mtime of its weights: unchanged stamps mean nothing was retrained."
    return {p.parent: p.stat().st_mtime_ns for p in Path(ckpt).rglob("trainable.safetensors")}


CASES = {  # id -> (model, pretrained: None = the registry's hub id read from the hub cache, data_root or None, modes)
    "clip-hf-hub": ("clip-vit-b-16-hf", None, "data", "full,lora,l_lora"),
    "clip-hf-local": ("clip-vit-b-16-hf", "local", None, "lora,l_lora"),  # data: the default `datasets` cache
    "openclip-hf-hub": ("clip-vit-b-16-openclip", "hf-hub", None, "lora,l_lora"),  # hf-hub:<repo> from the cache
    "openclip-local": ("clip-vit-b-16-openclip", "local", "data", "lora,l_lora"),  # a folder laid out as its hub repo
    "flan-t5-hub": ("flan-t5-base", None, "data", "lora,l_lora"),
    "flan-t5-local": ("flan-t5-base", "local", "data", "lora,l_lora"),  # a save_pretrained folder
}


@pytest.mark.parametrize("case", list(CASES))
def test_paper_profile_offline(world, case, tmp_path):
    model, pretrained, data_root, modes = CASES[case]
    params = ["-p", "model", model, "-p", "modes", modes, *TINY]
    if pretrained == "local": params += ["-r", "pretrained", str(world["local"][model])]
    if pretrained == "hf-hub": params += ["-r", "pretrained", world["hub_ids"][model]]
    if data_root: params += ["-r", "data_root", str(world[data_root])]
    ckpt = tmp_path / "checkpoints"
    tasks = GLUE if model == "flan-t5-base" else VISION

    papermill(world, "exp_finetune", tmp_path / "finetune", *params, "-r", "ckpt_dir", str(ckpt),
              "-p", "max_examples", "6", "-p", "sweep_examples", "4")
    single = pd.read_csv(tmp_path / "finetune" / "single_task.csv")
    n_modes = len(modes.split(","))
    assert set(single.task) == set(tasks) and len(single) == 2 * len(tasks) * n_modes  # zero-shot + fine-tuned
    # a random tiny T5 answers STS-B with one constant (or no) number: Spearman's rho is undefined (NaN) there
    assert single[single.task != "glue-stsb"].score.notna().all()
    stamps = checkpoint_stamps(ckpt)
    assert len(stamps) == len(tasks) * n_modes

    papermill(world, "exp_fusion", tmp_path / "fusion", *params, "-r", "ckpt_root", str(ckpt),
              "-p", "method", "task_arithmetic", "-p", "max_tasks", "2", "-p", "subsets_per_size", "1",
              "-p", "val_examples", "4", "-p", "test_examples", "4")
    assert checkpoint_stamps(ckpt) == stamps, "exp_fusion retrained checkpoints that exp_finetune had made"
    t1 = pd.read_csv(tmp_path / "fusion" / "table1.csv")
    assert set(t1.finetune_mode) == {"standard" if m == "full" else m for m in modes.split(",")}
    # one subset; it counts in Table 1 where some single-task reference is > 0 (a random tiny T5 scores 0 everywhere)
    assert set(t1.method) == {"task_arithmetic"} and t1.n_subsets.isin([0, 1]).all()
    sweep = pd.read_csv(tmp_path / "fusion" / "sweep.csv")
    assert set(sweep.task) == set(tasks)  # every merged model is scored on all 7 tasks
    assert (world["base"] / "hf" / "hub").is_dir() and not any((world["base"] / "llora").rglob("*.incomplete"))


def test_missing_copy_fails_before_fine_tuning(world, tmp_path):
    "Offline with one task's copy absent: one clear error naming it and the parameter, before anything is trained."
    env = dict(world["env"], HF_HOME=str(tmp_path / "empty-hf"))  # the default `datasets` cache is empty here
    r = subprocess.run([sys.executable, "-m", "papermill", "nbs/exp_finetune.ipynb", str(tmp_path / "o.ipynb"),
                        "--cwd", "nbs", "-p", "profile", "paper", "-p", "model", "clip-vit-b-16-hf",
                        "-r", "pretrained", str(world["local"]["clip-vit-b-16-hf"]), "-r", "out_dir", str(tmp_path),
                        "-r", "ckpt_dir", str(tmp_path / "ckpt")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "Cars" in err and "data_root" in err, err[-3000:]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("trainable.safetensors"))
