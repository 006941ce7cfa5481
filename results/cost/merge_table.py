"results/cost/cpu_merge.{csv,md}: exp_cost's merge table alone (the models' tables are left as they are), each merge in a fresh process."
import torch
from llora.cost import environment, merge_cost_isolated, merge_rss_table, write_tables
torch.set_num_threads(1)
COLS = ["method", "impl", "n_tasks", "entries_per_tv", "seconds", "time_vs_dense", "peak_extra_MB", "output_MB",
        "extra_beyond_output_in_tvs", "peak_extra_vs_dense", "peak_extra_vs_task_arithmetic", "rss_extra_MB",
        "max_abs_diff_vs_first_impl"]
tab = merge_cost_isolated(n=7, seed=0, repeats=1, arch="ViT-B-16")
tab = tab.merge(merge_rss_table(n=7, seed=0, arch="ViT-B-16"), on=["method", "impl"])
write_tables({"merge": tab}, "results/cost", "cpu", "HF_HUB_OFFLINE=1 .venv/bin/python results/cost/merge_table.py "
             "(the merge cell of nbs/exp_cost.ipynb: merge_cost_isolated + merge_rss_table, 7 ViT-B/16-shaped task vectors, 1 thread)",
             env=environment("cpu"), titles={"merge": "Merging cost"}, columns={"merge": COLS})
print(tab[COLS].to_string())
