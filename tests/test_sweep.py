"Sweep machinery: subset counts, executors (local and Ray), kill-and-resume of the shard store, selection split."
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pandas as pd
import pytest

from llora.sweep import (LocalExecutor, ShardStore, get_executor, key_hash, n_subsets, run_sweep, subsets)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- subsets
@pytest.mark.parametrize("n", range(2, 9))
def test_subset_count(n):
    tasks = [f"task{i}" for i in range(n)]
    s = subsets(tasks)
    assert len(s) == 2**n - (n + 1) == n_subsets(n)
    assert len(set(s)) == len(s) and all(len(x) >= 2 for x in s)
    assert [len(x) for x in s] == sorted(len(x) for x in s)


def test_subset_max_tasks():
    s = subsets(list("abcdefg"), max_tasks=3)
    assert len(s) == 21 + 35 and max(map(len, s)) == 3


# ---------------------------------------------------------------- toy job used by the kill test and executors
def toy_job(i):
    return [{"item": i, "j": j, "value": (i * 7919 + j) / 13} for j in range(3)]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from llora.sweep import run_sweep
    def job(i):
        time.sleep(float(sys.argv[3]))
        return [{"item": i, "j": j, "value": (i * 7919 + j) / 13} for j in range(3)]
    run_sweep(job, list(range(int(sys.argv[2]))), sys.argv[1], key=lambda i: {"unit": i})
""")


def _run_script(store, n, delay, **kw):
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store), str(n), str(delay)], cwd=ROOT,
                            env={**os.environ, "LLORA_PROGRESS": "0"}, **kw)


def test_kill_and_resume(tmp_path):
    "kill -9 a sweep mid-way, rerun it: the final table equals an uninterrupted run's (no duplicate, no lost row)."
    n = 40
    ref = run_sweep(toy_job, list(range(n)), tmp_path/"ref", key=lambda i: {"unit": i})
    store = ShardStore(tmp_path/"killed")
    p = _run_script(store.root, n, 0.1)
    deadline = time.time() + 300
    while len(store.shards()) < 5 and time.time() < deadline and p.poll() is None: time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    done = len(store.shards())
    assert 5 <= done < n, f"the sweep should have been killed mid-way ({done} of {n} shards)"
    (store.root/".leftover.json.tmp").write_text('{"key": {"unit": 0}, "rows": [{"item"')  # a torn write
    q = _run_script(store.root, n, 0.0); assert q.wait(timeout=600) == 0
    final = store.table([{"unit": i} for i in range(n)])
    pd.testing.assert_frame_equal(final, ref)
    assert len(store.shards()) == n and not final.duplicated().any() and len(final) == 3 * n
    assert store.table().sort_values(["item", "j"], ignore_index=True).equals(ref)


# ---------------------------------------------------------------- executors
def test_local_executor_order():
    assert LocalExecutor().map(toy_job, [2, 0]) == [toy_job(2), toy_job(0)]


FORWARD_PROBE = {"LLORA_DATA": "/nonexistent/llora-data-probe", "HF_DATASETS_CACHE": "/nonexistent/hf-datasets-probe"}


@pytest.fixture(scope="module")
def ray_gpus():
    "One local Ray instance for the module (Ray starts slowly) declaring 2 GPUs on this CPU machine; jobs take 1 GPU each."
    pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in FORWARD_PROBE}
    os.environ.update(FORWARD_PROBE)  # the driver's settings, captured into the runtime_env at start
    ex = get_executor("ray", num_cpus=2, gpus_per_job=1, init_kwargs={"num_gpus": 2})
    try: ex._init()
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    yield ex
    ex.shutdown()


def test_ray_executor_matches_local(tmp_path, ray_gpus):
    "The same sweep through the local Ray instance gives the same table as the local executor."
    ex = get_executor("ray", cpus_per_job=1)  # CPU jobs on the running instance
    items = list(range(6))
    assert ex.map(toy_job, items) == get_executor("local").map(toy_job, items)
    t_ray = run_sweep(toy_job, items, tmp_path/"ray", key=lambda i: {"unit": i}, executor=ex)
    t_local = run_sweep(toy_job, items, tmp_path/"local", key=lambda i: {"unit": i})
    pd.testing.assert_frame_equal(t_ray, t_local)


def gpu_job(item):
    "Wait until every job of the batch runs (so they are concurrent), then report the GPUs and environment this one sees."
    import ray
    folder, i, n = item
    Path(folder, f"started-{i}").touch()
    deadline = time.time() + 120
    while len(list(Path(folder).glob("started-*"))) < n and time.time() < deadline: time.sleep(0.05)
    return dict(concurrent=len(list(Path(folder).glob("started-*"))) == n,
                cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                env={k: os.environ.get(k) for k in FORWARD_PROBE})


def test_ray_concurrent_jobs_get_their_own_gpu(tmp_path, ray_gpus):
    "gpus_per_job=1 on 2 declared GPUs: the two jobs run at once, each with its own CUDA_VISIBLE_DEVICES; env forwarded."
    out = ray_gpus.map(gpu_job, [(str(tmp_path), i, 2) for i in range(2)])
    assert all(o["concurrent"] for o in out)
    assert all(o["cuda_visible"] is not None and o["cuda_visible"] == ",".join(o["gpu_ids"]) for o in out)
    assert len({o["cuda_visible"] for o in out}) == 2 and all(len(o["gpu_ids"]) == 1 for o in out)
    assert all(o["env"] == FORWARD_PROBE for o in out)


def test_ray_refuses_gpus_a_local_instance_lacks(ray_gpus):
    with pytest.raises(ValueError, match="gpus_per_job=3.*2 GPU"): get_executor("ray", gpus_per_job=3).map(toy_job, [1])
    with pytest.raises(ValueError, match="`gpus_per_job`"): get_executor("ray", gpus_per_job=-1)


def test_ray_runtime_env_reaches_cluster_workers(monkeypatch):
    "With a cluster address, llora's and the hub's settings still travel (the local sys.path does not)."
    pytest.importorskip("ray")
    from llora.sweep import FORWARDED_ENV, RayExecutor
    assert {"LLORA_CACHE", "LLORA_DATA", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE",
            "TRANSFORMERS_OFFLINE", "LLORA_PROGRESS"} <= set(FORWARDED_ENV)
    for k in FORWARDED_ENV: monkeypatch.setenv(k, f"/probe/{k}")
    kw = RayExecutor(address="ray://head:10001", init_kwargs={"runtime_env": {"env_vars": {"MINE": "1"}}}).ray_init_kwargs()
    assert kw["address"] == "ray://head:10001"
    assert kw["runtime_env"]["env_vars"] == {**{k: f"/probe/{k}" for k in FORWARDED_ENV}, "MINE": "1"}
    local = RayExecutor(num_cpus=1).ray_init_kwargs()["runtime_env"]["env_vars"]
    assert "PYTHONPATH" in local and local["LLORA_DATA"] == "/probe/LLORA_DATA"


def test_finetunes_and_shards_go_through_the_executor_with_resources(monkeypatch, tmp_path):
    "run_fusion_sweep hands cpus_per_job / gpus_per_job to the executor it builds, and runs fine-tunes and shards on it."
    import llora.sweep as S
    seen = []
    class Recorder(S.LocalExecutor):
        def __init__(self, **kw): seen.append(kw)
        def imap(self, fn, items, desc=None):
            seen.append((desc, len(items))); yield from super().imap(fn, items, desc)
    monkeypatch.setitem(S.EXECUTORS, "rec", Recorder)
    class Stop(Exception): pass
    def first_sweep(fn, items, store, key=None, executor=None, desc=None, **k):
        seen.append(("sweep", desc, executor)); raise Stop
    jobs = []
    monkeypatch.setattr(S, "finetune", lambda *a, **k: jobs.append(k) or str(tmp_path))
    monkeypatch.setattr(S, "run_sweep", first_sweep)
    with pytest.raises(Stop):
        S.run_fusion_sweep("minilm-l6", ["lora"], ["ties"], list(S.EMBEDDED_BENCHMARK[:2]), tmp_path, ckpt_root=tmp_path,
                           preset="tiny", tiny=True, executor="rec", cpus_per_job=2, gpus_per_job=1, device="cpu")
    assert seen[0] == {"cpus_per_job": 2, "gpus_per_job": 1}
    assert seen[1] == ("fine-tune", 2) and all(j["device"] == "cpu" for j in jobs)
    assert seen[2][:2] == ("sweep", "single-task scores") and isinstance(seen[2][2], Recorder)


def test_ray_missing_message(monkeypatch):
    import builtins
    real = builtins.__import__
    def fake(name, *a, **k):
        if name == "ray": raise ImportError("No module named 'ray'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"llora\[ray\]"): get_executor("ray")


# ---------------------------------------------------------------- hyperparameter selection: validation vs test
def scores_frame(scores:dict) -> pd.DataFrame:
    "What `FusionSetup.evaluated` returns, for scores given by hand (no per-example results)."
    return pd.DataFrame([dict(task=t, metric="accuracy", score=s, n=1, correct=None) for t, s in scores.items()])

def test_selection_on_validation_vs_test(monkeypatch):
    "select_on='validation' reports test scores at the validation-best grid point; 'test' keeps every grid point."
    import json, torch
    import llora.sweep as S
    from llora.task_vectors import TaskVector
    from llora.results import model_scores, normalize, reference_scores, select_best
    tasks = ("a", "b", "c")
    tvs = {t: TaskVector({"w": torch.tensor([1.0])}) for t in tasks}
    monkeypatch.setattr(S.FusionSetup, "context", lambda self: (None, tvs))
    peak = {"validation": 1.0, "test": 2.0}  # merged w = scaling * n_tasks; pairs: val prefers 0.5, test prefers 1.0
    def fake_evaluated(self, tv, split, tasks_=None):
        w = float(tv["w"][0])
        return scores_frame({t: 1.0 - abs(w - peak[split]) / 4 for t in (tasks_ or self.tasks)})
    monkeypatch.setattr(S.FusionSetup, "evaluated", fake_evaluated)
    setup = S.FusionSetup("toy", "l_lora", tasks, "/nonexistent")
    grid = tuple(S.canonical_json({"scaling": s}) for s in (0.5, 1.0))
    refs = json.dumps({sp: {t: 1.0 for t in tasks} for sp in ("validation", "test")})
    rows_val = S.fusion_unit(S.FusionUnit(setup, "task_arithmetic", ("a", "b"), grid, "validation", refs))
    rows_test = S.fusion_unit(S.FusionUnit(setup, "task_arithmetic", ("a", "b"), grid, "test", refs))
    df_val, df_test = pd.DataFrame(rows_val), pd.DataFrame(rows_test)
    assert sorted(df_val.split.unique()) == ["test", "validation"]
    assert df_val[df_val.split == "validation"].hparams.nunique() == 2
    assert set(df_val[df_val.split == "test"].hparams) == {'{"scaling":0.5}'}      # chosen on validation
    assert set(df_test.split) == {"test"} and df_test.hparams.nunique() == 2          # every grid point on test
    # the same choices through llora.results' aggregation
    single = pd.DataFrame([dict(model="toy", finetune_mode="l_lora", task=t, version=0, step=1, hparams="{}", split=sp,
                                score=1.0) for t in tasks for sp in ("validation", "test")])
    best_test = S.aggregate_sweep(df_test, single, select_on="test").best
    assert best_test.hparams.tolist() == ['{"scaling":1.0}']                           # the authors' protocol
    best_val = S.aggregate_sweep(df_val, single, select_on="validation").best
    assert best_val.hparams.tolist() == ['{"scaling":0.5}']
    sel = model_scores(normalize(df_val[df_val.split == "validation"], reference_scores(single[single.split == "validation"])))
    sc = model_scores(normalize(df_val[df_val.split == "test"], reference_scores(single[single.split == "test"])))
    assert select_best(sc, select_on=sel).hparams.tolist() == ['{"scaling":0.5}']
    assert best_val.normalized.iloc[0] < best_test.normalized.iloc[0]  # selecting on test is optimistic here


def test_single_grid_point_goes_straight_to_test(monkeypatch):
    "simple_average has nothing to select: scored on test once, whatever select_on says."
    import json, torch
    import llora.sweep as S
    from llora.task_vectors import TaskVector
    tasks = ("a", "b")
    monkeypatch.setattr(S.FusionSetup, "context", lambda self: (None, {t: TaskVector({"w": torch.tensor([1.0])}) for t in tasks}))
    calls = []
    def fake_evaluated(self, tv, split, tasks_=None):
        calls.append(split); return scores_frame({t: 0.5 for t in self.tasks})
    monkeypatch.setattr(S.FusionSetup, "evaluated", fake_evaluated)
    setup = S.FusionSetup("toy", "lora", tasks, "/nonexistent")
    refs = json.dumps({sp: {t: 1.0 for t in tasks} for sp in ("validation", "test")})
    for sel in ("validation", "test"):
        calls.clear()
        rows = S.fusion_unit(S.FusionUnit(setup, "simple_average", tasks, ("{}",), sel, refs))
        assert calls == ["test"] and [r["split"] for r in rows] == ["test", "test"]


# ---------------------------------------------------------------- data-driven methods in the sweep (issue 13)
def test_data_driven_methods_in_a_sweep(tmp_path, monkeypatch):
    """AdaMerging, Concrete Task Arithmetic and Fisher merging run as sweep units: their inputs come from a
    MergeContext on the selection split, the learned λ are recorded with the hyperparameters, and the rows have the
    sweep's schema."""
    import json
    from llora import sweep as S
    monkeypatch.setenv("LLORA_PROGRESS", "0")
    tasks = list(S.EMBEDDED_BENCHMARK[:2])
    res = S.run_fusion_sweep("minilm-l6", ["lora"], ["adamerging", "concrete_task_arithmetic", "fisher"], tasks,
                             tmp_path / "out", ckpt_root=tmp_path / "ck", preset="tiny", tiny=True,
                             val_examples=4, test_examples=4, device="cpu",
                             grids={"adamerging": [{"granularity": "task"}], "concrete_task_arithmetic": [{"scaling": 0.3}]},
                             method_kwargs={"adamerging": {"steps": 2}, "concrete_task_arithmetic": {"steps": 2}})
    r = res.results
    assert set(r.method) == {"adamerging", "concrete_task_arithmetic", "fisher"} and set(r.split) >= {"test"}
    ada = r[(r.method == "adamerging") & (r.split == "test")]
    assert len(ada) == len(tasks) and all(len(json.loads(h)["lambdas"]) == 2 for h in ada.hparams)
    assert r.score.between(0, 1).all()


def test_lora_native_regmean_and_lorahub_in_a_sweep(tmp_path, monkeypatch, capsys):
    """KnOTS and Core Space run on LoRA modes only; on L-LoRA, whose layers are linear in (A, B), both with task
    arithmetic inside score exactly as task arithmetic of the factors; RegMean runs in every mode (on ΔW for LoRA);
    LoraHub's loss comes from the merge context."""
    import json
    from llora import sweep as S
    monkeypatch.setenv("LLORA_PROGRESS", "0")
    tasks = list(S.EMBEDDED_BENCHMARK[:2])
    ta = [{"scaling": 0.7}]
    res = S.run_fusion_sweep("minilm-l6", ["full", "lora", "l_lora"], ["task_arithmetic", "knots", "core_space", "regmean",
                             "lorahub"], tasks, tmp_path / "out", ckpt_root=tmp_path / "ck", preset="tiny", tiny=True,
                             train_overrides={"steps": 3, "lr": 0.05}, val_examples=8, test_examples=8, device="cpu",
                             grids={"task_arithmetic": ta, "knots": [{"merge_with": "task_arithmetic", **ta[0]}],
                                    "core_space": [{"merge_with": "task_arithmetic", **ta[0]}]},
                             method_kwargs={"lorahub": {"budget": 3}})
    assert "knots on full" in capsys.readouterr().out
    r = res.results[res.results.split == "test"]
    assert set(r[r.finetune_mode == "standard"].method) == {"task_arithmetic", "regmean", "lorahub"}
    assert set(r[r.finetune_mode != "standard"].method) == {"task_arithmetic", "knots", "core_space", "regmean", "lorahub"}
    lin = r[r.finetune_mode == "l_lora"].pivot_table(index="task", columns="method", values="score")
    assert lin["knots"].tolist() == lin["task_arithmetic"].tolist() == lin["core_space"].tolist()
    hub = r[r.method == "lorahub"]
    assert all(len(json.loads(h)["weights"]) == 2 for h in hub.hparams) and r.score.between(0, 1).all()
    # the same identity on the merged models' logits, not only on accuracies
    import torch
    from llora.context import MergeContext, lora_space
    from llora.evaluate import applied
    from llora.fusion import fuse
    setup = S.FusionSetup("minilm-l6", "l_lora", tuple(tasks), str(tmp_path / "ck"), tiny=True, device="cpu")
    m, tvs = setup.context()
    parts = [tvs[t] for t in tasks]
    factors, kw = lora_space(m, parts)
    ctx = MergeContext(m, tasks, n_examples=8, batch_size=8)
    task, batch, logits = ctx.tasks[0], ctx._batches[0][0], []
    m.eval()  # no dropout
    for tv in (fuse("task_arithmetic", parts, scaling=0.7), fuse("knots", factors, **kw, merge_with="task_arithmetic", scaling=0.7)):
        with applied(m, tv), torch.no_grad(): logits.append(m.logits(task, batch))
    with torch.no_grad(): zero = m.logits(task, batch)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    assert (logits[0] - zero).abs().max() > 1e-3  # the merge moved the model


# ---------------------------------------------------------------- per-example results (issue 16, item 2)
def test_sweep_keeps_each_test_examples_result_for_paired_intervals(tmp_path, monkeypatch):
    """run_fusion_sweep writes examples.csv: every test row's per-example 0/1 results, whose mean is the row's score;
    through `fusion_per_task` they make `fusion_difference_ci` resample examples, paired across the two modes."""
    from llora import sweep as S
    from llora.evidence import fusion_difference_ci, fusion_per_task
    from llora.tasks import correct_values
    monkeypatch.setenv("LLORA_PROGRESS", "0")
    tasks = list(S.EMBEDDED_BENCHMARK[:2])
    res = S.run_fusion_sweep("minilm-l6", ["lora", "l_lora"], ["task_arithmetic"], tasks, tmp_path / "out",
                             ckpt_root=tmp_path / "ck", preset="tiny", tiny=True, train_overrides={"steps": 2},
                             val_examples=4, test_examples=8, device="cpu",
                             grids={"task_arithmetic": [{"scaling": 0.5}, {"scaling": 1.0}]})
    ex = pd.read_csv(res.paths["examples"])  # default parsing keeps the per-example strings
    assert list(ex.columns) == S.EXAMPLE_SCHEMA and set(ex.split) == {"test"} and "correct" not in res.results
    test = res.results[res.results.split == "test"]
    merged = test.merge(ex, on=["model", "finetune_mode", "method", "subset", "hparams", "split", "task"], validate="1:1")
    assert len(merged) == len(test) == len(ex) == 2 * len(tasks)  # 2 modes × one subset (a+b) × its tasks
    for r in merged.itertuples():
        bits = correct_values(r.correct)
        assert len(bits) == 8 and abs(sum(bits) / 8 - r.score) < 1e-12
    agg = res.aggregate()
    per_task = fusion_per_task(agg.best.assign(split="test"), res.results, res.single, examples=ex)
    c = fusion_difference_ci(per_task, n_test=8, B=200)
    assert c["paired_tasks"] == len(tasks) and c["ci_low"] <= c["estimate"] <= c["ci_high"]
