"Fault injection (fast, CPU, offline): bad inputs to linearization, fusion, normalization and the notebooks fail early and clearly, and lose nothing."
import copy, math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
from torch import nn

from llora.linearize import linearization_point, linearize_lora, linearized_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

D = torch.float64


def lora_mlp(seed=0, init=True):
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("q", nn.Linear(6, 8)); m.add_module("act", nn.Tanh()); m.add_module("v", nn.Linear(8, 3))
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=init)
    return get_peft_model(m.to(D), cfg).to(D)


def phi0_of(seed=0, init=True):
    return {k: v.clone() for k, v in linearization_point(linearize_lora(lora_mlp(seed, init))).items()}


# ------------------------------------------------------------------------------------ linearize_lora(init_state=)
def _unchanged(m):
    "The model is still a plain LoRA model: no layer linearized, and it can be linearized again."
    assert not linearized_layers(m)
    linearize_lora(m)
    assert len(linearized_layers(m)) == 2


def test_init_state_missing_layer_changes_nothing():
    m, phi0 = lora_mlp(), phi0_of()
    v_keys = [k for k in phi0 if ".v." in k]
    with pytest.raises(ValueError, match=r"init_state lacks .*\.v\.lora_A"):
        linearize_lora(m, init_state={k: x for k, x in phi0.items() if k not in v_keys})
    _unchanged(m)  # all or nothing: the layer `q`, checked first, was not linearized either


def test_init_state_wrong_shape_names_layer_and_shapes():
    m, phi0 = lora_mlp(), phi0_of()
    key = next(k for k in phi0 if ".v.lora_B." in k)
    bad = {**phi0, key: torch.zeros(4, 3, dtype=D)}
    with pytest.raises(ValueError, match=rf"{key}.*expected shape \(3, 3\).*got \(4, 3\)"):
        linearize_lora(m, init_state=bad)
    _unchanged(m)


@pytest.mark.parametrize("bad,msg", [(lambda s: s.to(torch.int64), "floating-point"),
                                     (lambda s: s.numpy(), "torch.Tensor"),
                                     (lambda s: s.fill_(float("nan")), "NaN or inf")])
def test_init_state_bad_tensors(bad, msg):
    m, phi0 = lora_mlp(), phi0_of()
    key = next(k for k in phi0 if ".q.lora_A." in k)
    with pytest.raises(ValueError, match=msg): linearize_lora(m, init_state={**phi0, key: bad(phi0[key])})
    _unchanged(m)


def test_init_state_all_zero_lora_branch_is_rejected():
    "A0 = B0 = 0: the expansion is the base model and no parameter gets a gradient (the LoRA branch is dead)."
    m, phi0 = lora_mlp(), phi0_of()
    zero = {k: (torch.zeros_like(v) if ".v." in k else v) for k, v in phi0.items()}
    with pytest.raises(ValueError, match=r"'base_model\.model\.v'.*adapter 'default'.*all zero"):
        linearize_lora(m, init_state=zero)
    _unchanged(m)


def test_current_values_all_zero_are_rejected_too():
    m = lora_mlp()
    with torch.no_grad(): m.base_model.model.q.lora_A["default"].weight.zero_()
    with pytest.raises(ValueError, match=r"'base_model\.model\.q'.*all zero"): linearize_lora(m)
    assert not linearized_layers(m)


def test_valid_init_state_with_one_zero_factor_still_works():
    "B0 = 0 (peft's default init) or A0 = 0 alone leave a trainable expansion: accepted."
    m, phi0 = lora_mlp(init=False), phi0_of(init=False)
    a_zero = {k: (torch.zeros_like(v) if "lora_A" in k else v) for k, v in phi0.items()}
    linearize_lora(m, init_state=a_zero)
    assert len(linearized_layers(m)) == 2


# ----------------------------------------------------------------------------------- normalized score: bad references
def test_mean_normalized_zero_reference_warns_and_leaves_the_task_out():
    from llora.sweep import mean_normalized
    with pytest.warns(UserWarning, match=r"single-task reference.*'b': 0\).*left out"):
        v = mean_normalized({"a": 0.4, "b": 0.3, "c": 0.9}, {"a": 0.8, "b": 0.0, "c": 0.9})  # was ZeroDivisionError
    assert v == pytest.approx((0.5 + 1.0) / 2)


def test_mean_normalized_negative_reference_does_not_reach_selection():
    "A negative reference (STS-B's Spearman) would rank a worse merged model higher: it is left out, with a warning."
    from llora.sweep import mean_normalized
    refs = {"a": 0.5, "stsb": -0.2}
    with pytest.warns(UserWarning, match=r"'stsb': -0\.2"):
        better, worse = mean_normalized({"a": 0.5, "stsb": 0.1}, refs), mean_normalized({"a": 0.5, "stsb": -0.3}, refs)
    assert better == worse == 1.0  # -0.3 / -0.2 = 1.5 would have beaten 0.1 / -0.2 = -0.5
    with pytest.warns(UserWarning, match=r"'a': nan"):
        assert mean_normalized({"a": 0.2, "b": float("nan")}, {"a": float("nan"), "b": 0.5}) == 0.0  # NaN score -> 0
    with pytest.warns(UserWarning, match=r"'a': 0\)"):  # nothing to normalize by: NaN, and the sweep goes on
        assert math.isnan(mean_normalized({"a": 0.2}, {"a": 0.0}))


def test_sweep_with_no_usable_reference_keeps_the_first_grid_point(monkeypatch):
    "Every single-task reference 0 (e.g. a tiny model on few examples): the unit ends, on the grid's first point."
    import json
    import llora.sweep as S
    tv = {"w": torch.ones(2)}
    monkeypatch.setattr(S.FusionSetup, "context", lambda self: (None, {"a": tv, "b": tv}))
    monkeypatch.setattr(S.FusionSetup, "evaluated", lambda self, tv, split, tasks=None: pd.DataFrame(
        dict(task=["a", "b"], metric="accuracy", score=[0.1, 0.2], n=1, correct=None)))
    setup = S.FusionSetup("minilm-l6", "lora", ("a", "b"), "/nonexistent", True)
    grid = tuple(S.canonical_json(h) for h in ({"scaling": 0.3}, {"scaling": 0.7}))
    refs = json.dumps({sp: {"a": 0.0, "b": 0.0} for sp in ("validation", "test")})
    with pytest.warns(UserWarning, match="mean_normalized"):
        rows = S.fusion_unit(S.FusionUnit(setup, "task_arithmetic", ("a", "b"), grid, "validation", refs, "{}"))
    test_rows = [r for r in rows if r["split"] == "test"]
    assert test_rows and {json.loads(r["hparams"])["scaling"] for r in test_rows} == {0.3}


def _tables(ref_b):
    import pandas as pd
    from llora.results import check_results
    single = pd.DataFrame([dict(model="m", finetune_mode="lora", task=t, version=0, step=5, hparams="{}", split="test",
                                score=s) for t, s in (("a", 0.8), ("b", ref_b))])
    rows = [dict(model="m", finetune_mode="lora", method="task_arithmetic", subset="a+b", n_tasks=2,
                 hparams=f'{{"scaling":{lam}}}', task=t, split="test", score=s)
            for lam, sa, sb in ((0.5, 0.4, 0.3), (1.0, 0.8, -0.1)) for t, s in (("a", sa), ("b", sb))]
    return check_results(pd.DataFrame(rows)), single


@pytest.mark.parametrize("ref_b", [0.0, -0.25])
def test_aggregate_with_a_non_positive_reference(ref_b):
    from llora.results import aggregate
    res, single = _tables(ref_b)
    with pytest.warns(UserWarning, match=rf"'m/lora/b': {ref_b:.4g}\)"):
        agg = aggregate(res, single)  # reference_scores raised ResultsError, the sweep's end crashed with it
    assert agg.per_task.set_index("task").loc["b", "normalized"] != agg.per_task.set_index("task").loc["b", "normalized"]  # NaN
    assert agg.best.iloc[0].hparams == '{"scaling":1.0}'  # chosen on task a alone: 0.8 / 0.8
    assert agg.best.iloc[0].normalized == pytest.approx(1.0)


# ------------------------------------------------------------------ notebook parameters: checked before any fine-tuning
# (each case starts a kernel and imports llora, ~12 s: the cases and one more per notebook)
from pathlib import Path
import time

NBS = Path(__file__).resolve().parents[1] / "nbs"


def papermill_error(notebook, tmp_path, **parameters):
    "Run `notebook` with `parameters` (outputs under tmp_path); return the message of the error it must stop with."
    pm = pytest.importorskip("papermill")
    parameters = dict(out_dir=str(tmp_path / "out"), ckpt_root=str(tmp_path / "ckpt"), **parameters)
    t0 = time.perf_counter()
    with pytest.raises(pm.PapermillExecutionError) as e:  # a cell running longer means fine-tuning started
        pm.execute_notebook(str(NBS / notebook), str(tmp_path / "executed.ipynb"), parameters=parameters,
                            cwd=str(NBS), kernel_name="python3", progress_bar=False, execution_timeout=60)
    assert time.perf_counter() - t0 < 90
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()  # nothing built, nothing written
    return str(e.value)


@pytest.mark.parametrize("params,msg", [
    (dict(method="tie"), r"Unknown fusion method\(s\) \['tie'\] \(parameter `method`\); valid: simple_average, task_arithmetic"),
    (dict(tasks="rt_polarity"), r"Parameter `tasks` must name at least 2 different tasks to merge, not 'rt_polarity'"),
    (dict(prompt_sets="descriptions,nope"), r"Parameter `prompt_sets` must be 'auto' or a comma-separated list of prompt sets"),
])
def test_exp_prompts_rejects_bad_parameters_before_fine_tuning(params, msg, tmp_path):
    import re
    assert re.search(msg, papermill_error("exp_prompts.ipynb", tmp_path, **params))


@pytest.mark.parametrize("params,msg", [
    (dict(pair="rt_polarity"), r"A task pair is 'task1:task2' with two different tasks, not 'rt_polarity'"),
    (dict(grid_points="nine"), r"Parameter `grid_points` must be an integer >= 2, not 'nine'"),
    (dict(lambda_min=2.0), r"must be finite numbers with lambda_min < lambda_max, not 2.0, 1.5"),
])
def test_exp_landscape_rejects_bad_parameters_before_fine_tuning(params, msg, tmp_path):
    import re
    assert re.search(msg, papermill_error("exp_landscape.ipynb", tmp_path, **params))


# -------------------------------------------------------------------------- report.ipynb: no report from missing inputs
RESULTS = NBS.parent / "results"


def _report_out(tmp_path):
    "An out_dir holding a copy of the committed report, to check it is left alone."
    import shutil
    out = tmp_path / "report_out"; out.mkdir()
    for f in ("report.md", "report.csv"): shutil.copy(RESULTS / "embedded" / f, out / f)
    return out


def run_report(tmp_path, **parameters):
    pm = pytest.importorskip("papermill")
    return pm.execute_notebook(str(NBS / "report.ipynb"), str(tmp_path / "report.ipynb"), parameters=parameters,
                               cwd=str(NBS), kernel_name="python3", progress_bar=False, execution_timeout=120)


@pytest.mark.parametrize("allow_missing", [False, True])
def test_report_refuses_a_results_dir_typo(tmp_path, allow_missing):
    pm = pytest.importorskip("papermill")
    out = _report_out(tmp_path); before = (out / "report.md").read_bytes()
    with pytest.raises(pm.PapermillExecutionError, match=r"results_dir '\.\./results/embeded' is not a folder"):
        run_report(tmp_path, results_dir="../results/embeded", out_dir=str(out), allow_missing=allow_missing)
    assert (out / "report.md").read_bytes() == before


def test_report_names_missing_inputs_and_writes_a_partial_report_only_when_asked(tmp_path):
    import shutil
    pm = pytest.importorskip("papermill")
    partial = tmp_path / "partial"
    shutil.copytree(RESULTS / "embedded" / "similarity", partial / "similarity")  # only exp_similarity was run
    out = _report_out(tmp_path); before = (out / "report.md").read_bytes()
    with pytest.raises(pm.PapermillExecutionError, match=r"5 input file\(s\) missing: .*fusion/table1\.csv.*allow_missing"):
        run_report(tmp_path, results_dir=str(partial), out_dir=str(out))
    assert (out / "report.md").read_bytes() == before
    run_report(tmp_path, results_dir=str(partial), out_dir=str(out), allow_missing=True)
    md = (out / "report.md").read_text()
    assert "cannot test" in md and ("supports" in md or "contradicts" in md or "inconclusive" in md)
    (tmp_path / "empty").mkdir()  # a folder without any result: no claim testable, nothing replaced
    with pytest.raises(pm.PapermillExecutionError, match="no claim can be tested"):
        run_report(tmp_path, results_dir=str(tmp_path / "empty"), out_dir=str(out), allow_missing=True)
    assert (out / "report.md").read_text() == md


# ------------------------------------------------------------------------ task vector files: truncation, corruption
def _saved(tmp_path):
    from llora.task_vectors import TaskVector
    tv = TaskVector({"a": torch.randn(100), "b": torch.randn(10, 10)})
    return tv, tv.save(tmp_path / "tv.safetensors")


@pytest.mark.parametrize("cut", [20, 0.5, -4])
def test_truncated_task_vector_file_names_the_file(tmp_path, cut):
    from llora.task_vectors import TaskVector
    _, p = _saved(tmp_path)
    raw = p.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[:int(len(raw) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable safetensors file.*TaskVector\.save"):
        TaskVector.load(bad)


def test_corrupted_task_vector_values_name_the_file_and_tensor(tmp_path):
    from llora.task_vectors import TaskVector
    _, p = _saved(tmp_path)
    raw = bytearray(p.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # safetensors: 8-byte header length, JSON header, then the data
    raw[start:start + 4] = bytes([0, 0, 0xC0, 0x7F])  # one float32 flipped to NaN
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"flipped\.safetensors: .*tensor '(a|b)' contains NaN or inf"):
        TaskVector.load(tmp_path / "flipped.safetensors")


# ------------------------------------------------------------------------------------ results files: truncation
@pytest.mark.parametrize("cut", ["mid_line", "header_only", "empty", "binary"])
def test_truncated_or_corrupted_results_csv_names_the_file(tmp_path, cut):
    from llora.results import ResultsError, load_results
    raw = (RESULTS / "embedded" / "fusion" / "sweep.csv").read_bytes()
    data = {"mid_line": raw[:len(raw) // 2], "header_only": raw[:raw.index(b"\n") + 1], "empty": b"",
            "binary": b"\x00\xff" * 50}[cut]
    (tmp_path / "sweep.csv").write_bytes(data)
    with pytest.raises(ResultsError, match=r"sweep\.csv: "): load_results(tmp_path / "sweep.csv")
