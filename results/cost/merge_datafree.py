"results/cost/cpu_merge_datafree.md: time and peak extra memory of the data-free methods over 7 ViT-B/16-shaped task vectors."
import torch
from llora.core import atomic_write_text
from llora.cost import environment, markdown_table, merge_cost, openclip_shapes, random_task_vectors
torch.set_num_threads(1)
tvs = random_task_vectors(openclip_shapes("ViT-B-16"), n=7, seed=0)
methods = {"task_arithmetic": dict(scaling=0.3), "dare": dict(p=0.5, scaling=0.3), "dare_ties": dict(p=0.5, scaling=0.3),
           "tsv_m": dict(scaling=1.0), "iso_c": dict(scaling=1.0), "iso_cts": dict(common_fraction=0.8, scaling=1.0)}
df = merge_cost(tvs, methods, impls=("llora.fusion",), repeats=1)
ta = float(df.loc[df.method == "task_arithmetic", "peak_extra_MB"].iloc[0])
df["peak_extra_vs_task_arithmetic"] = df.peak_extra_MB / ta
cols = ["method", "hparams", "n_tasks", "entries_per_tv", "seconds", "peak_extra_MB", "output_MB", "peak_extra_vs_task_arithmetic"]
atomic_write_text("results/cost/cpu_merge_datafree.md",
    "## Merging cost of the data-free methods (streamed, `llora.fusion`)\n\n"
    "Command: `HF_HUB_OFFLINE=1 .venv/bin/python results/cost/merge_datafree.py` (the script beside this file), "
    "1 torch thread, 7 random task vectors of open_clip ViT-B/16's shapes (the whole tower), 1 run each.\n\n"
    f"Machine: {environment('cpu')}\n\n" + markdown_table(df[cols]) + "\n")
print(df[cols].to_string())
