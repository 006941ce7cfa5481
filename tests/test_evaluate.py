"Property and regression tests of `llora.evaluate` (tiny configurations, fast, CPU, offline)."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")

import pytest
import torch

from llora.evaluate import applied, eval_batches, evaluate, merged_model, predictions, task_vectors
from llora.task_vectors import TaskVector
from llora.tasks import Task
from llora.train import base_model, finetune, load_finetuned, prepare, theta0

PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
         ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1),
         ("I fell asleep halfway through, it was so slow and so long and so badly written.", 0),
         ("The best film of the year.", 1), ("Bad.", 0), ("Good fun for the whole family, a joy from start to end.", 1)]
EXAMPLES = [{"text": t, "label": l} for t, l in PAIRS]
TOY = Task("toy-sentiment", classes=["negative", "positive"],
           label_descriptions=["a negative movie review", "a positive movie review"],
           loader=lambda task, split: list(EXAMPLES))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("runs")
    for mode in ("full", "lora", "l_lora"):
        finetune("minilm-l6", TOY, mode, preset="tiny", steps=6, out_dir=r, tiny=True, lr=2e-2)
    return r


def logits(m):
    m.eval()
    with torch.no_grad(): return m.logits(TOY, m.preprocess(TOY, EXAMPLES))


def test_evaluate_frame_and_order():
    m = prepare("minilm-l6", "lora", tiny=True)
    df = evaluate(m, [TOY], batch_size=4)
    assert list(df.columns) == ["task", "metric", "score", "n"]
    assert df.task.tolist() == ["toy-sentiment"] and df.n.tolist() == [len(EXAMPLES)] and df.metric[0] == "accuracy"
    p, r = predictions(m, TOY, batch_size=4)
    assert p == m.predict(TOY, m.preprocess(TOY, EXAMPLES)).tolist()       # original order despite length sorting
    assert r == [l for _, l in PAIRS]
    assert df.score[0] == pytest.approx(sum(a == b for a, b in zip(p, r)) / len(r))
    assert eval_batches(m, TOY, "test", 4) is eval_batches(m, TOY, "test", 4)  # cached
    assert evaluate(m, [TOY], max_examples=3).n[0] == 3


@pytest.mark.parametrize("mode", ["full", "lora", "l_lora"])
def test_theta0_plus_task_vector_is_the_finetuned_model(root, mode):
    tv = task_vectors("minilm-l6", mode, [TOY.name], root, tiny=True)[TOY.name]
    assert isinstance(tv, TaskVector) and tv.norm() > 0
    ft = load_finetuned(root / "minilm-l6-tiny" / mode / TOY.name)
    m = prepare("minilm-l6", mode, tiny=True)
    assert set(tv) == set(theta0(m))
    for fold in (True, False):
        with applied(m, tv, fold_lora=fold):
            torch.testing.assert_close(logits(m), logits(ft), atol=1e-4, rtol=1e-4)
            assert evaluate(m, [TOY]).score[0] == evaluate(ft, [TOY]).score[0]


@pytest.mark.parametrize("mode", ["full", "lora", "l_lora"])
def test_applied_restores_weights_exactly(root, mode):
    tv = task_vectors("minilm-l6", mode, [TOY.name], root, tiny=True)[TOY.name]
    m = prepare("minilm-l6", mode, tiny=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y0 = logits(m)
    with applied(m, tv * 0.7): assert not torch.equal(logits(m), y0)
    after = m.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(m), y0)
    with pytest.raises(RuntimeError):       # also restored when the block raises
        with applied(m, tv): raise RuntimeError("boom")
    assert all(torch.equal(before[k], m.state_dict()[k]) for k in before)


def test_folded_lora_runs_base_layers(root):
    from peft.tuners.lora import LoraLayer
    tv = task_vectors("minilm-l6", "l_lora", [TOY.name], root, tiny=True)[TOY.name]
    m = prepare("minilm-l6", "l_lora", tiny=True)
    layers = [l for l in m.modules() if isinstance(l, LoraLayer)]
    with applied(m, tv): assert all(l.merged for l in layers)
    assert not any(l.merged for l in layers)


def test_scaling_and_merged_model(root):
    tv = task_vectors("minilm-l6", "lora", [TOY.name], root, tiny=True)[TOY.name]
    m = prepare("minilm-l6", "lora", tiny=True)
    y0 = logits(m)
    with applied(m, tv, scaling=0.0): torch.testing.assert_close(logits(m), y0)
    with applied(m, tv, scaling=0.5): y_half = logits(m)
    with applied(m, tv * 0.5): torch.testing.assert_close(logits(m), y_half)
    mm = merged_model(m, tv * 0.5)
    assert type(mm.backbone).__name__ == "BertModel"
    torch.testing.assert_close(logits(mm), y_half, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(m), y0)       # the source model is untouched


def test_task_vectors_across_tasks_share_keys(root, tmp_path):
    other = Task("toy-other", classes=TOY.classes, label_descriptions=TOY.label_descriptions,
                 loader=lambda task, split: [dict(e, label=1 - e["label"]) for e in EXAMPLES])
    for t in (TOY, other):
        finetune("minilm-l6", t, "l_lora", preset="tiny", steps=3, out_dir=tmp_path, tiny=True, lr=2e-2)
    tvs = task_vectors("minilm-l6", "l_lora", [TOY.name, other.name], tmp_path, tiny=True)
    a, b = tvs[TOY.name], tvs[other.name]
    assert set(a) == set(b)
    m = prepare("minilm-l6", "l_lora", tiny=True)
    with applied(m, a + b): y = logits(m)
    assert torch.isfinite(y).all()


def test_errors(root):
    m = prepare("minilm-l6", "lora", tiny=True)
    with pytest.raises(ValueError, match="valid modes"): task_vectors("minilm-l6", "qlora", [TOY.name], root, tiny=True)
    with pytest.raises(FileNotFoundError): task_vectors("minilm-l6", "ntk", [TOY.name], root, tiny=True)
    with pytest.raises(ValueError, match="Unknown task"): evaluate(m, ["no-such-task"])
    with pytest.raises(KeyError, match="match no parameter"):
        with applied(m, {"nope.weight": torch.zeros(1)}): pass
    with pytest.raises(ValueError, match="θ0"):
        with applied(base_model("minilm-l6", tiny=True), {}): pass
