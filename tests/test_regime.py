"The regime study's measures (issue 16): the linearization gap of a LoRA model and the intervals it is reported with."
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llora.evidence import mean_score_ci, rank_correlation_ci, verdict_from_ci
from llora.linearize import linearized_layers
from llora.metrics import linearization_gap


def toy(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 2))
    pm = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2", "4"], lora_dropout=0.0))
    point = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(seed + 1)
    direction = {n: torch.randn(v.shape, generator=g) for n, v in point.items()}
    return pm, point, direction


def set_update(pm, point, direction, eps, move_a=True):
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n in point: p.copy_(point[n] + eps * direction[n] * (move_a or ".lora_B." in n))


X = torch.randn(32, 5, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("seed", [0, 1])
def test_gap_vanishes_linearly_as_the_update_shrinks(seed):
    "f − f_lin is second order in the update and f − f_0 first order: gap(ε) ∝ ε."
    pm, point, direction = toy(seed)
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        set_update(pm, point, direction, eps)
        gaps.append(linearization_gap(pm, lambda: pm(X), point)["gap"])
    assert gaps[0] > 0
    for a, b in zip(gaps, gaps[1:]): assert b / a == pytest.approx(0.1, rel=0.3)


def test_gap_is_zero_when_a_has_not_moved():
    "With A = A0 every LoRA layer is linear in B: the linearized model is the model, though B moved far."
    pm, point, direction = toy()
    set_update(pm, point, direction, 2.0, move_a=False)
    r = linearization_gap(pm, lambda: pm(X), point)
    assert r["change"] > 1e-2 and r["lin_error"] < 1e-10 and r["gap"] < 1e-10


def test_gap_restores_the_model_and_checks_its_inputs():
    pm, point, direction = toy()
    set_update(pm, point, direction, 0.3)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    y = pm(X)
    r = linearization_gap(pm, lambda: [pm(X[:10]), pm(X[10:])], point)
    assert 0 < r["gap"] < np.inf and r["lin_error"] > 0
    assert not linearized_layers(pm) and torch.equal(pm(X), y)
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())
    with pytest.raises(ValueError, match="not parameters"): linearization_gap(pm, lambda: pm(X), {"x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="must return"): linearization_gap(pm, lambda: None, point)
    set_update(pm, point, direction, 0.0)  # no update: the ratio is undefined, not an error
    assert np.isnan(linearization_gap(pm, lambda: pm(X), point)["gap"])


def test_gap_of_a_task_model_inside_applied():
    "The notebook's use: a `prepare`d LoRA TaskModel holding θ0 + τ (not folded), logits on held-out batches, θ0 as init_state."
    from llora.train import prepare, theta0
    from llora.evaluate import applied, eval_batches
    from llora.tasks import EMBEDDED_BENCHMARK, get_task
    m = prepare("minilm-l6", "lora", tiny=True)
    task = get_task(EMBEDDED_BENCHMARK[0])
    g = torch.Generator().manual_seed(0)
    tv = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in theta0(m).items()}
    batches = eval_batches(m, task, "test", batch_size=8, max_examples=8)
    outputs = lambda: [m.logits(task, b) for b in batches]
    m.eval()
    with applied(m, tv, fold_lora=False):
        r = linearization_gap(m, outputs, theta0(m))
        with pytest.raises(ValueError, match="merged"):  # folded (merged) LoRA layers cannot be linearized
            with applied(m, None): linearization_gap(m, outputs, theta0(m))
    assert r["change"] > 0 and 0 < r["gap"] < np.inf
    only_b = {k: (v if ".lora_B." in k else torch.zeros_like(v)) for k, v in tv.items()}
    with applied(m, only_b, fold_lora=False): r_b = linearization_gap(m, outputs, theta0(m))
    assert r_b["gap"] < 1e-6 < r_b["change"]


def test_mean_score_ci():
    exact = mean_score_ci([0.9, 0.5], n=None, refs=[0.9, 1.0])
    assert exact["estimate"] == pytest.approx(0.75) and exact["ci_low"] == exact["ci_high"] == pytest.approx(0.75)
    r = mean_score_ci([0.9, 0.5], n=[48, 48], refs=[0.9, 1.0], seed=1)
    assert r["ci_low"] < 0.75 < r["ci_high"] and r["n_tasks"] == 2
    with pytest.raises(ValueError, match="1-D"): mean_score_ci([], n=48)


def test_rank_correlation_ci():
    x = np.linspace(0, 1, 9)
    down = rank_correlation_ci(x, -np.exp(x))
    assert down["estimate"] == pytest.approx(-1) and verdict_from_ci(down["ci_low"], down["ci_high"]) == "contradicts"
    few = rank_correlation_ci(x[:4], x[:4])
    assert few["estimate"] == pytest.approx(1) and np.isnan(few["ci_low"]) and few["n_units"] == 4
    assert rank_correlation_ci([0, 1, np.nan, 3, 4, 5], [1, 2, 3, np.nan, 5, 6])["n_units"] == 4  # NaN pairs dropped
    with pytest.raises(ValueError, match="one length"): rank_correlation_ci([1, 2], [1, 2, 3])


# ---------------------------------------------------------------- exp_regime's parameters
from test_paperpath import run_notebook_setup  # the notebooks' setup cells, executed with papermill-style overrides

BAD_REGIME_PARAMETERS = [
    (dict(steps_grid="25,fifty"), "`steps_grid` must be a comma-separated list of integers"),
    (dict(steps_grid="25,2.5"), "`steps_grid` must be"),
    (dict(steps_grid="25,25"), "`steps_grid` repeats"),
    (dict(lr_factors="0,1"), "`lr_factors` must be a comma-separated list of numbers > 0"),
    (dict(methods="tie"), "valid: simple_average"),
    (dict(gap_examples=0), "`gap_examples` must be"),
    (dict(device="tpu"), "Unknown device 'tpu'"),
    (dict(profile="papr"), "valid: embedded, paper, smoke"),
]


def test_regime_grid_is_written_before_any_training(tmp_path, monkeypatch):
    "The setup cell resolves the grid (lr = the preset's rate of each mode × factor) and writes grid.csv; nothing is trained."
    import pandas as pd
    import llora.sweep as S
    monkeypatch.setattr(S, "check_available", lambda cfg, **kw: None)
    ns = run_notebook_setup("exp_regime", out_dir=str(tmp_path / "out"), ckpt_root=str(tmp_path / "ck"))
    g = pd.read_csv(tmp_path / "out" / "grid.csv")
    assert list(g.point) == [f"s{s}_lr{f:g}" for s in (25, 50, 200) for f in (0.333333, 1, 3)]
    assert g.lr_lora.tolist()[:3] == pytest.approx([1e-3, 3e-3, 9e-3], rel=1e-5)
    assert g.lr_l_lora.tolist()[:3] == pytest.approx([2e-3, 6e-3, 1.8e-2], rel=1e-5)
    assert ns["cfg"]["methods"] == ("task_arithmetic", "ties") and not (tmp_path / "ck").exists()


# ---------------------------------------------------------------- exp_degree's parameters
BAD_DEGREE_PARAMETERS = [
    (dict(degrees="0.5,1"), "`degrees` must list distinct shares strictly between 0 and 1"),
    (dict(degrees="half"), "`degrees` must list"),
    (dict(degrees="0.5,0.5"), "`degrees` must list distinct"),
    (dict(grid_points="25"), "`grid_points` must list distinct steps:factor pairs"),
    (dict(grid_points="25:3,25:3"), "`grid_points` must list distinct"),
    (dict(grid_points="25:0"), "`grid_points` must list"),
    (dict(methods="tie"), "valid: simple_average"),
    (dict(profile="papr"), "valid: embedded, paper, smoke"),
]


@pytest.mark.parametrize("notebook, params, message", [("exp_regime", *b) for b in BAD_REGIME_PARAMETERS]
                         + [("exp_degree", *b) for b in BAD_DEGREE_PARAMETERS], ids=lambda x: str(x)[:30])
def test_notebook_rejects_bad_parameters_before_anything_runs(tmp_path, notebook, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run_notebook_setup(notebook, out_dir=str(tmp_path / "out"), ckpt_root=str(tmp_path / "ck"), **params)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


def test_degree_design_trains_every_degree_at_l_loras_rate(tmp_path, monkeypatch):
    "The design: degrees 0 (LoRA), the given shares and 1 (L-LoRA) per point, every one at the preset's L-LoRA rate × factor."
    import pandas as pd
    import llora.sweep as S
    monkeypatch.setattr(S, "check_available", lambda cfg, **kw: None)
    run_notebook_setup("exp_degree", out_dir=str(tmp_path / "out"), ckpt_root=str(tmp_path / "ck"))
    d = pd.read_csv(tmp_path / "out" / "design.csv")
    assert d.degree.round(3).tolist() == [0, 0.333, 0.667, 1] * 2 and d["mode"].tolist() == ["lora"] + ["l_lora"] * 3 + ["lora"] + ["l_lora"] * 3
    assert d.lr.tolist() == pytest.approx([1.8e-2] * 4 + [6e-3] * 4, rel=1e-6) and set(d.point) == {"s25_lr3", "s50_lr1"}
    assert not (tmp_path / "ck").exists()
