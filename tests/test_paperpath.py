"""The paper path's plumbing: model options and data roots reach the checkpoints, fine-tune once / fuse many times,
every bad notebook parameter fails before any fine-tuning, and the availability check names all that is missing."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")
import configparser, subprocess, sys, time, warnings
from pathlib import Path

import pytest

import llora.train as T
import llora.sweep as S
from llora.tasks import Task, register_task

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"pp_fruit": ["apple", "banana"], "pp_colour": ["red", "blue"]}
SEEN_ROOTS = []


def _loader(task, split, root=None):
    "A toy loader that, like the paper tasks' loaders, takes `root=`; it records where it was asked to read."
    SEEN_ROOTS.append(root)
    classes = task.classes
    return [{"text": f"the {classes[i % 2]} number {i} {split}", "label": i % 2} for i in range(16)]


TASKS = [register_task(Task(n, classes=c, loader=_loader), overwrite=True).name for n, c in WORDS.items()]


@pytest.fixture
def train_calls(monkeypatch):
    "Count the training loops that actually run (the evidence of reuse: no timing involved)."
    calls = []
    real = T.train
    def counted(model, task, hp, **kw):
        calls.append((task.name, hp["steps"])); return real(model, task, hp, **kw)
    monkeypatch.setattr(T, "train", counted)
    return calls


def _sweep(tmp_path, out, **kw):
    return S.run_fusion_sweep("minilm-l6", ["lora"], ["task_arithmetic"], TASKS, tmp_path / out, ckpt_root=tmp_path / "ckpt",
                              preset="tiny", tiny=True, grids={"task_arithmetic": [{"scaling": 1.0}]}, val_examples=4,
                              test_examples=4, **kw)


def test_finetune_once_fuse_many_times(tmp_path, train_calls):
    "exp_finetune's runs (steps=3) are reused by the sweep with the same overrides; other steps warn, then retrain."
    ckpts = {t: T.finetune("minilm-l6", t, "lora", preset="tiny", steps=3, out_dir=tmp_path / "ckpt", tiny=True) for t in TASKS}
    assert len(train_calls) == 2
    stamps = {t: (c / "trainable.safetensors").stat().st_mtime_ns for t, c in ckpts.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reuse must be silent
        sw = _sweep(tmp_path, "a", train_overrides={"steps": 3})
    assert len(train_calls) == 2, train_calls                     # nothing trained
    assert stamps == {t: (c / "trainable.safetensors").stat().st_mtime_ns for t, c in ckpts.items()}
    assert set(sw.single.step) - {0} == {3}
    with pytest.warns(UserWarning, match=r"hparams\.steps: stored 3, requested 5"):
        sw5 = _sweep(tmp_path, "b", train_overrides={"steps": 5})
    assert train_calls[2:] == [(t, 5) for t in TASKS]
    assert set(sw5.single.step) - {0} == {5}


def test_model_options_are_part_of_the_checkpoint(tmp_path, train_calls):
    "Other model options never reuse a checkpoint silently; the sweep rebuilds θ0 with the recorded options."
    ck = T.finetune("minilm-l6", TASKS[0], "full", preset="tiny", steps=1, out_dir=tmp_path, tiny=True,
                    model_kw={"init_seed": 3})
    assert T.load_meta(ck)["config"]["model_kw"] == {"init_seed": 3}
    assert "model_kw" not in T.load_meta(T.finetune("minilm-l6", TASKS[1], "full", preset="tiny", steps=1, out_dir=tmp_path,
                                                    tiny=True))["config"]  # runs without options keep their old config
    n = len(train_calls)
    T.finetune("minilm-l6", TASKS[0], "full", preset="tiny", steps=1, out_dir=tmp_path, tiny=True, model_kw={"init_seed": 3})
    assert len(train_calls) == n                                  # same options: reused
    with pytest.warns(UserWarning, match=r"model_kw: stored \{'init_seed': 3\}, requested '<unset>'"):
        T.finetune("minilm-l6", TASKS[0], "full", preset="tiny", steps=1, out_dir=tmp_path, tiny=True)
    assert len(train_calls) == n + 1
    # θ0 of a full fine-tuning run is the pre-trained model: the sweep's context rebuilds it with the run's options
    sw_kw = {"init_seed": 4}
    with pytest.warns(UserWarning, match=r"requested \{'init_seed': 4\}"):
        S.ensure_checkpoints("minilm-l6", ["full"], TASKS, tmp_path, "tiny", tiny=True, model_kw=sw_kw, steps=1)
    S._context.cache_clear()
    m, tvs = S.FusionSetup("minilm-l6", "full", tuple(TASKS), str(tmp_path), True, model_kw=S._options_json(sw_kw)).context()
    ref = T.base_model("minilm-l6", tiny=True, **sw_kw)
    w = lambda mod: dict(mod.named_parameters())["backbone.embeddings.word_embeddings.weight"]
    assert (T.theta0(m)["backbone.embeddings.word_embeddings.weight"] == w(ref)).all()
    S._context.cache_clear()
    with pytest.raises(ValueError, match="trained with model options"):
        S.FusionSetup("minilm-l6", "full", tuple(TASKS), str(tmp_path), True).context()  # asks for the defaults
    S._context.cache_clear()


def test_data_root_reaches_the_loaders(tmp_path):
    "data_root travels from the sweep to every loader call of training and evaluation."
    SEEN_ROOTS.clear()
    _sweep(tmp_path, "r", train_overrides={"steps": 1}, data_root=tmp_path / "data")
    assert SEEN_ROOTS and set(SEEN_ROOTS) == {str(tmp_path / "data")}
    assert T.resolve_task(TASKS[0], tmp_path).options["root"] == str(tmp_path)
    from llora.tasks import get_task
    emb = get_task("rt_polarity")
    assert T.resolve_task("rt_polarity", tmp_path) is emb  # loaders without `root=` are left as they are


@pytest.mark.parametrize("kw, message", [
    (dict(tasks=TASKS[:1]), "at least 2 tasks"),
    (dict(methods=["tie"]), "Unknown fusion method"),
    (dict(subsets_per_size="two"), "integer >= 1"),
    (dict(train_overrides={"stepz": 2}), "Unknown hyperparameter"),
    (dict(modes=["qlora"]), "Unknown fine-tuning mode"),
])
def test_sweep_fails_before_fine_tuning(tmp_path, train_calls, kw, message):
    args = dict(model="minilm-l6", modes=["lora"], methods=["task_arithmetic"], tasks=TASKS, out_dir=tmp_path,
                ckpt_root=tmp_path / "ckpt", preset="tiny", tiny=True) | kw
    t = time.perf_counter()
    with pytest.raises(ValueError, match=message): S.run_fusion_sweep(**args)
    assert not train_calls and time.perf_counter() - t < 5


def test_check_available_passes_when_everything_is_there_offline(monkeypatch):
    "HF_HUB_OFFLINE=1 with everything at hand is not an error (the old check refused every paper run offline)."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    S.check_available(S.resolve_setup("smoke", tasks=",".join(TASKS)))


def test_check_available_lists_everything_missing(tmp_path, monkeypatch, train_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = S.resolve_setup("smoke", model="clip-vit-b-16-hf", tasks=f"{TASKS[0]},DTD", pretrained=str(tmp_path / "nothing"),
                          data_root=tmp_path)
    cfg["tiny"] = False
    with pytest.raises(S.MissingInputsError) as e: S.check_available(cfg)
    msg = str(e.value)
    assert msg.count("\n- ") == 4 and "model 'clip-vit-b-16-hf'" in msg and "task 'DTD' split 'validation'" in msg
    assert TASKS[0] not in msg.split("\n", 1)[1] and not train_calls


def test_paper_extra_declares_what_the_paper_path_imports():
    "settings.ini: the `paper` extra has datasets (every paper task) and what the paper models/loaders import."
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    names = lambda key: {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].lower() for r in d[key].split()}
    assert {"datasets", "accelerate", "pillow", "torchvision", "scipy"} <= names("paper_requirements") | names("requirements")
    assert "datasets" in names("paper_requirements") and "datasets" in names("dev_requirements")
    probe = ("import json, setuptools; setuptools.setup = lambda **kw: print(json.dumps(kw['extras_require'])); "
             "__file__ = 'setup.py'; exec(open(__file__).read())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    extras = __import__("json").loads(out.stdout)
    assert extras["paper"] == d["paper_requirements"].split() and "ray" in extras
    assert "pip install -e '.[paper]'" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- the notebooks' own setup cells
def run_notebook_setup(name, **params):
    "Execute a notebook's cells up to its setup cell (the one resolving the profile), with papermill-style overrides."
    import nbformat
    cells = [c.source for c in nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code"]
    last = next(i for i, s in enumerate(cells) if "resolve_setup(" in s or "resolve_profile(" in s)
    ns = {}
    old = os.getcwd(); os.chdir(ROOT / "nbs")
    try:
        exec(cells[0] + "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items()), ns)
        for src in cells[1:last + 1]: exec(src, ns)
    finally: os.chdir(old)
    return ns


BAD_PARAMETERS = [
    ("exp_fusion", dict(tasks="rt_polarity"), "at least 2 tasks"),
    ("exp_fusion", dict(method="tie"), "valid: simple_average"),
    ("exp_fusion", dict(subsets_per_size="two"), "`subsets_per_size` must be"),
    ("exp_fusion", dict(modes="lora,qlora"), "valid: full"),
    ("exp_fusion", dict(tasks="rt_polarity,nope"), "Registered tasks"),
    ("exp_fusion", dict(model="bert"), "registered models"),
    ("exp_fusion", dict(preset="fast"), "presets: clip-paper"),
    ("exp_fusion", dict(steps="two"), "`steps` must be"),
    ("exp_fusion", dict(profile="papr"), "valid: embedded, paper, smoke"),
    ("exp_finetune", dict(profile="papr"), "valid: embedded, paper, smoke"),
    ("exp_finetune", dict(lr="fast"), "`lr` must be a number"),
    ("exp_finetune", dict(modes="qlora"), "valid: full"),
    ("exp_finetune", dict(max_examples="ten"), "`max_examples` must be"),
    ("exp_finetune", dict(sweep_examples=-3), "`sweep_examples` must be"),
    ("exp_finetune", dict(split="dev"), "`split` must be"),
    ("exp_landscape", dict(pair="rt_polarity"), "task1:task2"),
    ("exp_landscape", dict(grid_points="nine"), "`grid_points` must be"),
    ("exp_disentanglement", dict(pairs="rt_polarity:nope"), "Registered tasks"),
    ("exp_prompts", dict(method="tie"), "valid: simple_average"),
    ("exp_prompts", dict(tasks="rt_polarity"), "at least 2 different tasks"),
    ("exp_similarity", dict(tasks="nope,spam"), "Registered tasks"),
    ("exp_similarity", dict(device="tpu"), "Unknown device 'tpu'"),
    ("exp_landscape", dict(device="tpu"), "Unknown device 'tpu'"),
    ("exp_disentanglement", dict(device="tpu"), "Unknown device 'tpu'"),
    ("exp_prompts", dict(device="tpu"), "Unknown device 'tpu'"),
    ("exp_fusion", dict(device="tpu"), "Unknown device 'tpu'"),
    ("exp_finetune", dict(device="tpu"), "Unknown device 'tpu'"),
]


@pytest.mark.parametrize("name, params, message", BAD_PARAMETERS, ids=lambda x: str(x)[:30])
def test_notebook_rejects_bad_parameters_before_fine_tuning(tmp_path, train_calls, name, params, message):
    "issue 12: each bad parameter fails within seconds, naming what is valid, with nothing fine-tuned or written."
    dirs = dict(ckpt_dir=str(tmp_path / "ck")) if name == "exp_finetune" else dict(ckpt_root=str(tmp_path / "ck"))
    t = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_notebook_setup(name, out_dir=str(tmp_path / "out"), **dirs, **params)
    assert time.perf_counter() - t < 10 and not train_calls and not (tmp_path / "ck").exists()


def test_notebook_setup_resolves_the_paper_profile(tmp_path):
    "`-p profile paper -p model flan-t5-base` means the 7 GLUE tasks and flan-t5-paper, in exp_finetune as in exp_fusion."
    import llora.sweep as S
    checked = []
    real = S.check_available
    try:
        S.check_available = lambda cfg, **kw: checked.append(cfg)  # the notebooks import it: no models or data here
        ft = run_notebook_setup("exp_finetune", profile="paper", model="flan-t5-base", steps=7, pretrained="/w/flan",
                                out_dir=str(tmp_path))
        fu = run_notebook_setup("exp_fusion", profile="paper", model="flan-t5-base", steps=7, pretrained="/w/flan",
                                out_dir=str(tmp_path))
    finally: S.check_available = real
    for cfg in (ft["cfg"], fu["cfg"]):
        assert cfg["tasks"][0] == "glue-cola" and len(cfg["tasks"]) == 7 and cfg["preset"] == "flan-t5-paper"
        assert cfg["train_overrides"] == {"steps": 7} and cfg["model_kw"] == {"pretrained": "/w/flan"}
    assert fu["cfg"]["modes"] == ("full", "lora", "l_lora") and len(checked) == 2


def test_exp_fusion_runs_to_the_end_with_modes_besides_lora(tmp_path):
    "`-p modes ia3,l_ia3`: every cell runs, the figures included (the curves' figure once asked for LoRA modes only)."
    import subprocess, sys
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "papermill", "exp_fusion.ipynb", str(tmp_path / "run.ipynb"), "-k", "python3",
                        "-p", "profile", "smoke", "-p", "modes", "ia3,l_ia3", "-p", "method", "task_arithmetic",
                        "-p", "out_dir", str(out), "-p", "ckpt_root", str(tmp_path / "ck")], cwd=ROOT / "nbs",
                       capture_output=True, text=True, timeout=600, env={**os.environ, "LLORA_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    import pandas as pd
    assert set(pd.read_csv(out / "best.csv").finetune_mode) == {"ia3", "l_ia3"} and (out / "normalized_vs_tasks.png").exists()
