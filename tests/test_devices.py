"""One device policy and mixed precision: device resolution, AMP in training (CPU autocast, GradScaler), reduced-precision
evaluation and its agreement with fp32, task vectors and sweep setups on a device. CPU only; CUDA-only paths are checked
by mocking what CUDA would report, and run for real when a GPU is present."""
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLORA_PROGRESS", "0")

import pytest
import torch

from llora.evaluate import evaluate, precision_agreement, predictions, task_vectors
from llora.tasks import Task
from llora.train import (MIXED_PRECISION, amp_dtype, autocast, finetune, grad_scaler, load_meta, prepare, resolve_device,
                         resolve_hparams, train)

PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
         ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1),
         ("I fell asleep halfway through.", 0), ("The best film of the year.", 1)]
EXAMPLES = [{"text": t, "label": l} for t, l in PAIRS]
TOY = Task("toy-devices", classes=["negative", "positive"], label_descriptions=["a negative review", "a positive review"],
           loader=lambda task, split: list(EXAMPLES))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_resolve_device_policy(monkeypatch):
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a launched process on a GPU node: its own GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_amp_dtype_table(monkeypatch):
    assert [amp_dtype(p, "cpu") for p in MIXED_PRECISION] == [None, torch.bfloat16, torch.float16, None]
    with pytest.raises(ValueError, match="mixed_precision.*valid: no, bf16, fp16, auto"): amp_dtype("fp8", "cpu")
    for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):  # "auto" on a GPU with / without bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        assert amp_dtype("auto", torch.device("cuda")) == want
    with autocast("cpu", "bf16"): assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "no"): assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert grad_scaler("cpu", "fp16").is_enabled() and not grad_scaler("cpu", "bf16").is_enabled()
    assert not grad_scaler("cpu", "no").is_enabled()


def _trained(mp, steps=4):
    m = prepare("minilm-l6", "lora", tiny=True, device="cpu")
    hp = resolve_hparams("tiny", "lora", steps=steps, lr=1e-2, mixed_precision=mp)
    log = train(m, TOY, hp, seed=0, device="cpu")
    return m, log


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_amp_training_on_cpu(mp):
    "AMP trains on one device (CPU autocast; fp16 through a GradScaler): finite losses, parameters move, fp32 kept."
    m, log = _trained(mp)
    assert len(log["losses"]) == 4 and all(torch.isfinite(torch.tensor(l)) for _, l in log["losses"])
    t0 = prepare("minilm-l6", "lora", tiny=True, device="cpu").trainable_state_dict()
    sd = m.trainable_state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())  # master weights stay fp32
    assert max(float((sd[k] - t0[k]).abs().max()) for k in sd) > 1e-3
    ref, _ = _trained("no")  # reduced precision changes the result only a little on this tiny problem
    rs = ref.trainable_state_dict()
    assert max(float((sd[k] - rs[k]).abs().max()) for k in sd) < 5e-2


def test_bad_mixed_precision_is_a_clear_error():
    m = prepare("minilm-l6", "lora", tiny=True, device="cpu")
    with pytest.raises(ValueError, match="parameter `mixed_precision`"):
        train(m, TOY, resolve_hparams("tiny", "lora", steps=1, mixed_precision="half"), device="cpu")
    with pytest.raises(ValueError, match="valid: no, bf16, fp16, auto"): evaluate(m, [TOY], mixed_precision="fp4")


def test_fp32_is_not_recorded(tmp_path):
    "mixed_precision='no' is the default: its checkpoints are the same run as one without the option (no retraining)."
    assert "mixed_precision" not in resolve_hparams("tiny", "lora", mixed_precision="no")
    assert resolve_hparams("tiny", "lora", mixed_precision="bf16")["mixed_precision"] == "bf16"
    a = finetune("minilm-l6", TOY, "lora", preset="tiny", steps=1, tiny=True, out_dir=tmp_path, device="cpu")
    stamp = (a / "meta.json").stat().st_mtime_ns
    b = finetune("minilm-l6", TOY, "lora", preset="tiny", steps=1, tiny=True, out_dir=tmp_path, device="cpu",
                 mixed_precision="no")
    assert a == b and (b / "meta.json").stat().st_mtime_ns == stamp


def test_precision_agreement_on_tiny_models():
    "fp32 against itself agrees exactly; bf16's accuracy differs from fp32's by at most the share of changed predictions."
    for mode in ("lora", "full"):
        m = prepare("minilm-l6", mode, tiny=True, device="cpu")
        same = precision_agreement(m, [TOY], "no", batch_size=4)
        assert same.loc[0, "diff"] == 0 and same.loc[0, "agreement"] == 1
        pa = precision_agreement(m, [TOY, TOY], "bf16", batch_size=4)
        assert list(pa.columns) == ["task", "metric", "fp32", "bf16", "diff", "agreement", "n"] and len(pa) == 2
        assert (pa["diff"].abs() <= 1 - pa["agreement"] + 1e-9).all()
        assert pa.loc[0, "fp32"] == evaluate(m, [TOY], mixed_precision="no").loc[0, "score"]
        p16, _ = predictions(m, TOY, mixed_precision="bf16")
        assert pa.loc[0, "agreement"] == sum(a == b for a, b in zip(predictions(m, TOY, mixed_precision="no")[0], p16)) / len(p16)


def test_evaluate_and_task_vectors_follow_the_device(tmp_path):
    "`evaluate(device=)` moves the model; task vectors live on θ0's device or the one asked for."
    m = prepare("minilm-l6", "lora", tiny=True, device="cpu")
    assert all(v.device.type == "cpu" for v in m.llora_theta0.values())
    evaluate(m, [TOY], device="cpu")
    assert m.device.type == "cpu"
    finetune("minilm-l6", TOY, "lora", preset="tiny", steps=1, tiny=True, out_dir=tmp_path, device="cpu")
    tv = task_vectors(m, "lora", [TOY.name], tmp_path, tiny=True, device="cpu")[TOY.name]
    assert {v.device.type for v in tv.values()} == {"cpu"}


def test_vectors_device_fits_or_falls_back(monkeypatch):
    from llora.sweep import vectors_device
    assert vectors_device(torch.device("cpu"), 1 << 40) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    gpu = torch.device("cuda", 0)
    assert vectors_device(gpu, 3_000) == gpu                 # 3 × 3000 <= 10000 free: merge on the GPU
    assert vectors_device(gpu, 4_000) == torch.device("cpu")  # no room for the merge's temporaries: stay on the CPU


def test_fusion_setup_precision_in_keys(monkeypatch):
    "fp32 evaluation keeps the old unit keys (existing stores resume); a reduced precision gets keys of its own."
    import llora.sweep as S
    monkeypatch.setattr(S.FusionSetup, "fingerprint", lambda self: "f")
    base = dict(model="minilm-l6", mode="lora", tasks=("a", "b"), ckpt_root="/x", tiny=True)
    cpu = S.FusionSetup(**base, device="cpu").key()
    assert "precision" not in cpu and cpu == S.FusionSetup(**base, device="cpu", mixed_precision="no").key()
    assert S.FusionSetup(**base, device="cpu", mixed_precision="bf16").key()["precision"] == "bfloat16"
    with pytest.raises(ValueError, match="mixed_precision"): S.FusionSetup(**base, mixed_precision="int8")
    with pytest.raises(ValueError, match="`device`"): S.resolve_profile("smoke", device="gpu0")
    with pytest.raises(ValueError, match="`gpus_per_job`"): S.resolve_profile("smoke", gpus_per_job=-1)
    assert S.resolve_profile("smoke", gpus_per_job=1)["gpus_per_job"] == 1


@cuda
def test_on_the_gpu(tmp_path):
    "With a GPU: 'auto' trains there in bf16/fp16, evaluates under autocast, and the checkpoint equals the CPU's format."
    ck = finetune("minilm-l6", TOY, "lora", preset="tiny", steps=2, tiny=True, out_dir=tmp_path, mixed_precision="auto")
    assert load_meta(ck)["finished"]
    m = prepare("minilm-l6", "lora", tiny=True)
    assert m.device.type == "cuda" and all(v.is_cuda for v in m.llora_theta0.values())
    tv = task_vectors(m, "lora", [TOY.name], tmp_path, tiny=True)[TOY.name]
    assert all(v.is_cuda for v in tv.values())
    pa = precision_agreement(m, [TOY], "auto")
    assert (pa["diff"].abs() <= 1 - pa["agreement"] + 1e-9).all()


def test_bad_devices_fail_at_once_naming_the_parameter(monkeypatch):
    "A misspelt device, or a GPU this machine lacks, is a ValueError naming `device` before any model is built."
    with pytest.raises(ValueError, match="Unknown device 'tpu' \\(parameter `device`\\)"): resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no usable CUDA GPU"): resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="2 CUDA GPU\\(s\\), cuda:0 to cuda:1"): resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
