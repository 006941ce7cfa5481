"""DDP on CPU: 2 processes (torchrun, gloo) train lora, l_lora and full like one process at the same global batch.

The worker script trains each mode with `llora.train.train` (dropout off) and through `finetune`; rank 0 saves the
trained parameters. The test trains the same models in this process and compares."""
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "lora", "l_lora")
STEPS, BATCH = 3, 4

COMMON = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    from torch import nn
    from llora.tasks import Task
    from llora.train import finetune, prepare, resolve_hparams, train
    PAIRS = [("An awful, boring film.", 0), ("A wonderful, moving masterpiece.", 1), ("Dull plot and terrible acting.", 0),
             ("Brilliant and funny, I loved it!", 1), ("A waste of two hours.", 0), ("Great cast, great story.", 1),
             ("I fell asleep halfway through.", 0), ("The best film of the year, truly.", 1)]
    EX = [{"text": t, "label": l} for t, l in PAIRS]
    TOY = Task("toy-ddp", classes=["negative", "positive"], label_descriptions=["a negative review", "a positive review"],
               loader=lambda task, split: list(EX))

    def trained(mode, steps, batch_size, **hp_kw):
        "A tiny MiniLM trained in `mode` with every dropout off; returns (trainable state, per-step local batch sizes, log)."
        m = prepare("minilm-l6", mode, tiny=True, device="cpu", **({} if mode == "full" else {"dropout": 0.0}))
        for mod in m.modules():
            if isinstance(mod, nn.Dropout): mod.p = 0.0
        sizes, loss = [], m.loss
        def counting_loss(task, batch):
            sizes.append(int(batch["label"].shape[0])); return loss(task, batch)
        m.loss = counting_loss
        hp = resolve_hparams("tiny", mode, steps=steps, batch_size=batch_size, lr=1e-2, **hp_kw)
        log = train(m, TOY, hp, seed=0, device="cpu")
        return {k: v.detach().clone() for k, v in m.trainable_state_dict().items()}, sizes, log
''')

WORKER = COMMON + textwrap.dedent('''
    from llora.core import save_tensors
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    for mode in ("full", "lora", "l_lora"):
        sd, sizes, log = trained(mode, int(sys.argv[2]), int(sys.argv[3]))
        if rank == 0: save_tensors(sd, out / f"{mode}.safetensors")
        ck = finetune("minilm-l6", TOY, mode, preset="tiny", steps=2, tiny=True, out_dir=out / "runs", device="cpu")
        # one file per rank and mode: two ranks printing at once can interleave their lines on the shared stdout
        (out / f"result-{mode}-{rank}.json").write_text(json.dumps(dict(
            rank=rank, mode=mode, sizes=sizes, losses=log["losses"], ckpt=str(ck), finished=(ck / "meta.json").exists())))
    _, _, log = trained("lora", int(sys.argv[2]), int(sys.argv[3]), mixed_precision="bf16")  # AMP under DDP
    (out / f"amp-lora-{rank}.json").write_text(json.dumps(dict(rank=rank, losses=log["losses"])))
''')


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLORA_PROGRESS": "0"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    "One `torchrun --nproc_per_node 2` run of the worker (CPU, gloo); bounded by a timeout."
    pytest.importorskip("accelerate")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists(): pytest.skip("torchrun is not installed")
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"; script.write_text(WORKER)
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out), str(STEPS), str(BATCH)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    results = [json.loads(f.read_text()) for f in sorted(out.glob("result-*.json"))]
    results += [dict(json.loads(f.read_text()), mode="amp-lora") for f in sorted(out.glob("amp-lora-*.json"))]
    return out, results


def test_every_mode_finishes_with_split_global_batches(ddp_run):
    "Each rank takes the preset's number of steps on half of each global batch; both ranks return the written checkpoint."
    out, results = ddp_run
    results = [r for r in results if r["mode"] != "amp-lora"]
    assert sorted((r["mode"], r["rank"]) for r in results) == sorted((m, k) for m in MODES for k in (0, 1))
    for mode in MODES:
        r0, r1 = [r for r in results if r["mode"] == mode and r["rank"] == 0][0], [r for r in results if r["mode"] == mode and r["rank"] == 1][0]
        assert r0["sizes"] == r1["sizes"] == [BATCH // 2] * STEPS
        assert r0["losses"] == r1["losses"] and len(r0["losses"]) == STEPS  # the global batch's loss, on every rank
        assert r0["ckpt"] == r1["ckpt"] and r0["finished"] and r1["finished"]
        meta = json.loads((Path(r0["ckpt"]) / "meta.json").read_text())
        assert meta["steps"] == 2 and meta["config"]["hparams"]["batch_size"] == PRESET_BATCH
        assert (Path(r0["ckpt"]) / "trainable.safetensors").exists()
        if mode != "full": assert (Path(r0["ckpt"]) / "adapter" / "adapter_model.safetensors").exists()


PRESET_BATCH = 4  # `PRESETS["tiny"]["batch_size"]`


@pytest.mark.parametrize("mode", MODES)
def test_ddp_parameters_equal_single_process(ddp_run, mode):
    """2 processes × 2 examples = 1 process × 4 examples, up to float rounding.

    Per step DDP averages the two ranks' mean-loss gradients (all-reduce sum / 2), which is the full batch's mean-loss
    gradient computed in another summation order, and each half batch is padded to its own length (masked positions
    change nothing mathematically). So each gradient agrees to ~1e-6 relative (float32 rounding of a few additions),
    and Adam, whose update is at most ~lr per step, turns that into parameter differences far below lr·steps = 3e-2.
    We ask for 1e-4 absolute on every trained parameter (300× below the size of one step) and 1e-3 relative on the
    change from θ0 as a whole: a wrong batch split, a skipped step, or unsynchronized gradients move parameters by
    ~lr = 1e-2 and fail it. Measured (2-core CPU): max differences 1.5e-5 (full: Adam divides tiny gradients by
    their own size, so their rounding shows most), 3.7e-7 (lora), 1.3e-7 (l_lora); relative 2e-5 / 9e-7 / 4e-7."""
    from llora.core import load_tensors
    from llora.train import prepare
    out, _ = ddp_run
    ns = {}; exec(COMMON, ns)
    ref, sizes, _ = ns["trained"](mode, STEPS, BATCH)
    assert sizes == [BATCH] * STEPS
    ddp = load_tensors(out / f"{mode}.safetensors")
    assert set(ddp) == set(ref)
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-4, f"{mode}: max |θ_ddp - θ_single| = {worst:.3g}"
    t0 = {k: v for k, v in prepare("minilm-l6", mode, tiny=True, device="cpu",
                                   **({} if mode == "full" else {"dropout": 0.0})).trainable_state_dict().items()}
    moved = torch.cat([(ref[k] - t0[k]).flatten() for k in ref]).norm()
    diff = torch.cat([(ddp[k] - ref[k]).flatten() for k in ref]).norm()
    assert moved > 1e-3 and diff / moved < 1e-3, f"{mode}: relative difference {float(diff / moved):.3g}"


def test_amp_under_ddp(ddp_run):
    """bf16 autocast under DDP (accelerate's mixed_precision): both ranks finish with the same finite losses, which
    differ from the fp32 run's by bf16 rounding (so autocast was on) and stay within 5e-2 of them (so it is the same
    training)."""
    _, results = ddp_run
    amp = [r for r in results if r["mode"] == "amp-lora"]
    fp32 = [r for r in results if r["mode"] == "lora" and r["rank"] == 0][0]
    assert sorted(r["rank"] for r in amp) == [0, 1] and amp[0]["losses"] == amp[1]["losses"]
    lo, hi = [l for _, l in amp[0]["losses"]], [l for _, l in fp32["losses"]]
    assert len(lo) == len(hi) == STEPS and all(abs(a - b) < 5e-2 for a, b in zip(lo, hi)) and lo != hi, (lo, hi)
