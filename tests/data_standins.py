"""Tiny stand-ins of the 14 paper tasks in every on-disk format `llora.tasks.find_copy` accepts.

`write_sources(root, tasks, source)` writes a few examples per class (8x8 images, short sentences) of each task in
one format under `root`, deterministically, so that loaders and the paper notebooks can run offline. The true task
label of every example can be read back from the example itself (`true_label`): an image's colour encodes it, a
sentence names its class. The `hub_cache` stand-in is made by `datasets` itself (its parquet builder) and laid out as
`load_dataset(repo, config, cache_dir=root)` leaves it, so the real offline `load_dataset` call finds it.
"""
import csv, hashlib, shutil, tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from llora.tasks import CLASS_ALIASES, get_task

WRITERS = {}  # source -> writer(task, root); each applies to the tasks of `applies_to`
GLUE_FIELDS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
               "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
               "rte": ("sentence1", "sentence2")}
GLUE_DIRS = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qqp": "QQP", "rte": "RTE", "sst2": "SST-2", "stsb": "STS-B"}
TORCHVISION_TASKS = ("SVHN", "DTD", "GTSRB", "EuroSAT", "Cars", "SUN397")


def _writer(source, applies_to):
    def deco(f): WRITERS[source] = (f, applies_to); return f
    return deco


def applies(source, task):
    "Whether stand-ins of `source` exist for `task`."
    return WRITERS[source][1](get_task(task))


def write_sources(root, tasks, source):
    "Write stand-ins of `tasks` (names) in the format `source` (a key of `WRITERS`) under `root`; returns `root`."
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write, ok = WRITERS[source]
    for name in tasks:
        task = get_task(name)
        if not ok(task): raise ValueError(f"No {source!r} stand-in for task {task.name!r}")
        write(task, root)
    return root


# ---- the examples -----------------------------------------------------------------------------------------------
def per_class(task):
    "(train, own validation, test) examples per class."
    if task.group == "glue": return (8, 0, 3)
    return (4, 1, 2) if task.n_classes <= 50 else (2, 0, 1)


def colour(label, split):
    "The colour encoding a task label (robust to JPEG)."
    return (10 * (label % 25), 10 * (label // 25), {"train": 40, "validation": 120, "test": 200}[split])


def true_label(example):
    "The task label a stand-in image encodes in its colour."
    r, g, _ = example["image"].convert("RGB").getpixel((4, 4))
    return int(round(r / 10)) + 25 * int(round(g / 10))


def stated_answer(example):
    "What a stand-in GLUE example's text says its answer is (the class name, or the score)."
    return example["input"].rsplit(" says ", 1)[1].rstrip(".")


def vision_items(task, split):
    "(image, task label) pairs of a split ('train', 'validation' or 'test'), class by class."
    k = dict(zip(("train", "validation", "test"), per_class(task)))[split]
    return [(Image.new("RGB", (8, 8), colour(c, split)), c) for c in range(task.n_classes) for _ in range(k)]


def glue_rows(task, split):
    "Rows with the hub's fields of a GLUE split ('train', 'validation', or the unlabelled 'test')."
    config = task.options["hub"][1]
    k = {"train": 8, "validation": 3, "test": 2}[split]
    if task.kind == "regression":
        n = 2 * k * 3
        labels = [5.0 * i / (n - 1) for i in range(n)]
    else:
        labels = [c for c in range(task.n_classes) for _ in range(k)]
    rows = []
    for i, y in enumerate(labels):
        what = f"{y:.2f}" if task.kind == "regression" else task.classes[y]
        row = {f: f"{split} {i} {f} says {what}." for f in GLUE_FIELDS[config]}
        row["label"] = -1 if split == "test" else y
        row["idx"] = i
        rows.append(row)
    return rows


def glue_split_names(task):
    return ["train", "validation_matched" if task.options["hub"][1] == "mnli" else "validation", "test"]


def hf_splits(task):
    "Split name -> `datasets.Dataset` as on the hub (vision: class names in reverse task order, to test mapping by name)."
    import datasets
    if task.group == "glue":
        label = (datasets.Value("float32") if task.kind == "regression" else datasets.ClassLabel(names=task.classes))
        feats = datasets.Features({**{f: datasets.Value("string") for f in GLUE_FIELDS[task.options["hub"][1]]},
                                   "label": label, "idx": datasets.Value("int32")})
        out = {}
        for name, split in zip(glue_split_names(task), ("train", "validation", "test")):
            rows = glue_rows(task, split)
            out[name] = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in feats}, features=feats)
        return out
    n = task.n_classes
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=task.classes[::-1])})
    out = {}
    for split in ("train", "test"):
        items = vision_items(task, split)
        out[split] = datasets.Dataset.from_dict({"image": [i for i, _ in items], "label": [n - 1 - c for _, c in items]},
                                                features=feats)
    return out


# ---- datasets formats ---------------------------------------------------------------------------------------------
def _hub(task):
    repo, config = task.options["hub"]
    return repo, config or "default"


@_writer("hub_cache", lambda t: True)
def write_hub_cache(task, root):
    "What `datasets.load_dataset(repo, config, cache_dir=root)` leaves: `<ns>___<name>/<config>/0.0.0/<hash>/`."
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet
    from datasets.naming import camelcase_to_snakecase
    datasets.disable_progress_bars()
    repo, config = _hub(task)
    ns, name = repo.split("/")
    commit = hashlib.sha1(f"{repo}/{config}".encode()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, ds in hf_splits(task).items():
            files[split] = str(Path(tmp) / f"{split}-00000-of-00001.parquet")
            ds.to_parquet(files[split])
        features = next(iter(hf_splits(task).values())).features
        builder = Parquet(cache_dir=str(Path(tmp) / "build"), dataset_name=camelcase_to_snakecase(name),
                          config_name=config, config_id=config, hash=commit, data_files=files, features=features)
        builder.download_and_prepare()
        dest = root / f"{ns}___{camelcase_to_snakecase(name)}" / config / str(builder.config.version) / commit
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists(): shutil.rmtree(dest)
        shutil.move(builder.cache_dir, dest)


@_writer("save_to_disk", lambda t: True)
def write_save_to_disk(task, root):
    "A `DatasetDict.save_to_disk` folder `<task>/`."
    import datasets
    datasets.DatasetDict(hf_splits(task)).save_to_disk(str(root / task.name))


@_writer("save_to_disk_splits", lambda t: True)
def write_save_to_disk_splits(task, root):
    "One `Dataset.save_to_disk` folder per split: `<task>/<split>/`."
    for split, ds in hf_splits(task).items(): ds.save_to_disk(str(root / task.name / split))


@_writer("parquet", lambda t: True)
def write_parquet(task, root):
    "The hub's parquet export: `glue/<config>/<split>-00000-of-00001.parquet`, `<name>/data/<split>-...parquet`."
    repo, config = _hub(task)
    d = root / "glue" / config if task.group == "glue" else root / repo.split("/")[-1] / "data"
    d.mkdir(parents=True, exist_ok=True)
    for split, ds in hf_splits(task).items(): ds.to_parquet(str(d / f"{split}-00000-of-00001.parquet"))


@_writer("csv", lambda t: t.group == "glue")
def write_csv(task, root):
    "`<config>/<split>.csv` with a header of the hub's columns (`Dataset.to_csv`); RTE, SST-2 and STS-B as `.tsv`."
    config = task.options["hub"][1]
    d = root / config
    d.mkdir(parents=True, exist_ok=True)
    tsv = config in ("rte", "sst2", "stsb")
    for split, ds in hf_splits(task).items():
        ds.to_csv(str(d / f"{split}.{'tsv' if tsv else 'csv'}"), index=False, **({"sep": "\t"} if tsv else {}))


# ---- GLUE's own distribution --------------------------------------------------------------------------------------
def _tsv(path, header, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        if header: w.writerow(header)
        w.writerows(rows)


def _glue_file_rows(task, split):
    "Rows of GLUE's own TSV layout of `task` for split 'train' / 'validation'."
    config = task.options["hub"][1]
    rows = glue_rows(task, split)
    name = lambda r: task.classes[r["label"]]
    if config == "cola": return None, [["gj04", r["label"], "" if r["label"] else "*", r["sentence"]] for r in rows]
    if config == "sst2": return ["sentence", "label"], [[r["sentence"], r["label"]] for r in rows]
    if config == "mrpc":
        return (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                [[r["label"], 1000 * (split == "validation") + 2 * r["idx"], 1000 * (split == "validation") + 2 * r["idx"] + 1,
                  r["sentence1"], r["sentence2"]] for r in rows])
    if config == "qqp":
        return (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                [[r["idx"], 2 * r["idx"], 2 * r["idx"] + 1, r["question1"], r["question2"], r["label"]] for r in rows])
    if config == "stsb":
        return (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
                [[r["idx"], "main-captions", "MSRvid", "2012test", r["idx"], "none", "none", r["sentence1"], r["sentence2"],
                  f"{r['label']:.3f}"] for r in rows])
    if config == "mnli":
        labels = ["label1"] + ([f"label{i}" for i in range(2, 6)] if split == "validation" else [])
        return (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", *labels, "gold_label"],
                [[r["idx"], r["idx"], f"{r['idx']}n", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", r["premise"],
                  r["hypothesis"], *[name(r)] * len(labels), name(r)] for r in rows])
    if config == "rte":
        return ["index", "sentence1", "sentence2", "label"], [[r["idx"], r["sentence1"], r["sentence2"], name(r)] for r in rows]
    raise ValueError(config)


@_writer("glue_tsv", lambda t: t.group == "glue")
def write_glue_tsv(task, root):
    "GLUE's distribution (`download_glue_data.py`): `glue_data/<CoLA...>/train.tsv`, `dev.tsv` (MNLI `dev_matched.tsv`)."
    config = task.options["hub"][1]
    d = root / "glue_data" / GLUE_DIRS[config]
    for split, fname in (("train", "train.tsv"), ("validation", "dev_matched.tsv" if config == "mnli" else "dev.tsv")):
        header, rows = _glue_file_rows(task, split)
        _tsv(d / fname, header, rows)
    _tsv(d / "test.tsv", ["index", *GLUE_FIELDS[config]], [[i, *["test"] * len(GLUE_FIELDS[config])] for i in range(2)])


@_writer("glue_tsv_msr", lambda t: t.name == "glue-mrpc")
def write_mrpc_msr(task, root):
    "MRPC as Microsoft distributes it: `MRPC/msr_paraphrase_{train,test}.txt` (with a BOM), and GLUE's `dev_ids.tsv`."
    d = root / "MRPC"
    header, train = _glue_file_rows(task, "train")
    _, dev = _glue_file_rows(task, "validation")
    _tsv(d / "msr_paraphrase_train.txt", header, [r for pair in zip(train, dev) for r in pair] + train[len(dev):], bom=True)
    _tsv(d / "msr_paraphrase_test.txt", header, [[0, 1, 2, "t1", "t2"]], bom=True)
    _tsv(d / "dev_ids.tsv", None, [[r[1], r[2]] for r in dev])


# ---- image trees and torchvision layouts --------------------------------------------------------------------------
def class_dir(task, c):
    "The folder name of class `c` in image trees (EuroSAT's and GTSRB's own names where they have them)."
    return CLASS_ALIASES[task.name][c] if task.name in CLASS_ALIASES else task.classes[c].replace("/", "_").replace(" ", "_")


def _save(image, path, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **({"quality": 95} if path.suffix == ".jpg" else {}))


@_writer("image_folder", lambda t: t.modality == "image")
def write_image_folder(task, root):
    "`<task>/{train,test}/<class>/<i>.png` (DTD also `val/`)."
    splits = ("train", "validation", "test") if task.name == "DTD" else ("train", "test")
    for split in splits:
        folder = {"validation": "val"}.get(split, split)
        for i, (img, c) in enumerate(vision_items(task, split)):
            _save(img, root / task.name / folder / class_dir(task, c) / f"{i}.png")


@_writer("class_folders", lambda t: t.modality == "image")
def write_class_folders(task, root):
    "One folder per class (RESISC45's own distribution `NWPU-RESISC45/<class>/`; others `<task>/<class>/`)."
    base = root / ("NWPU-RESISC45" if task.name == "RESISC45" else task.name)
    for i, (img, c) in enumerate(vision_items(task, "train") + vision_items(task, "test")):
        _save(img, base / class_dir(task, c) / f"{class_dir(task, c)}_{i}.jpg")


def _struct(rows, fields):
    arr = np.zeros((len(rows),), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows): arr[i] = tuple(r)
    return arr


@_writer("torchvision", lambda t: t.name in TORCHVISION_TASKS)
def write_torchvision(task, root):
    "The files torchvision 0.29's dataset class of the task reads (with download=False)."
    from scipy.io import savemat
    name = task.name
    if name == "SVHN":
        for split in ("train", "test"):
            items = vision_items(task, split)
            X = np.stack([np.asarray(i.resize((32, 32))) for i, _ in items], axis=-1).astype(np.uint8)
            y = np.array([[10 if c == 0 else c] for _, c in items], dtype=np.uint8)
            savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
    elif name == "DTD":
        base = root / "dtd" / "dtd"
        for split, fname in (("train", "train1.txt"), ("validation", "val1.txt"), ("test", "test1.txt")):
            lines = []
            for i, (img, c) in enumerate(vision_items(task, split)):
                rel = f"{task.classes[c]}/{task.classes[c]}_{split}_{i:04d}.jpg"
                _save(img, base / "images" / rel)
                lines.append(rel)
            (base / "labels").mkdir(parents=True, exist_ok=True)
            (base / "labels" / fname).write_text("\n".join(lines) + "\n")
    elif name == "GTSRB":
        base = root / "gtsrb"
        for i, (img, c) in enumerate(vision_items(task, "train")):
            _save(img, base / "GTSRB" / "Training" / f"{c:05d}" / f"00000_{i:05d}.ppm", "PPM")
        rows = []
        for i, (img, c) in enumerate(vision_items(task, "test")):
            _save(img, base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", "PPM")
            rows.append(f"{i:05d}.ppm;8;8;0;0;7;7;{c}")
        (base / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "\n".join(rows) + "\n")
    elif name == "EuroSAT":
        for i, (img, c) in enumerate(vision_items(task, "train") + vision_items(task, "test")):
            _save(img, root / "eurosat" / "2750" / class_dir(task, c) / f"{class_dir(task, c)}_{i}.jpg")
    elif name == "Cars":
        base = root / "stanford_cars"
        (base / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([task.classes], dtype=object)})
        for split, folder, annos in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                                     ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
            rows = []
            for i, (img, c) in enumerate(vision_items(task, split)):
                _save(img, base / folder / f"{i + 1:05d}.jpg")
                rows.append((0, 0, 7, 7, c + 1, f"{i + 1:05d}.jpg"))
            savemat(annos, {"annotations": _struct(rows, ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"))})
    elif name == "SUN397":
        base = root / "SUN397"
        paths = [f"/{c.replace(' ', '_')[0]}/{c.replace(' ', '_')}" for c in task.classes]
        base.mkdir(parents=True, exist_ok=True)
        (base / "ClassName.txt").write_text("\n".join(paths) + "\n")
        for i, (img, c) in enumerate(vision_items(task, "train") + vision_items(task, "test")):
            _save(img, base / paths[c].lstrip("/") / f"sun_{i:06d}.jpg")
    else: raise ValueError(name)
