"""Tiny random stand-ins of the paper models, in the exact on-disk formats real copies have.

* `write_hub_cache(cache_dir)`: the Hugging Face hub cache layout that `huggingface_hub` writes when it downloads
  (`models--org--name/{blobs/<etag>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<etag>}`; the etag of a
  git-LFS file is its sha256, of any other file its git blob sha1), for the repos the paper models read:
  `openai/clip-vit-base-patch16`, `google/flan-t5-base`, `sentence-transformers/all-MiniLM-L6-v2` and the three
  `timm/vit_*_clip_224.openai` repos that open_clip's `pretrained='openai'` reads.
* `write_local_copies(folder)`: the same models as local folders (`save_pretrained` folders; for open_clip a folder
  laid out like its hub repos), and `write_checkpoint_files(folder)`: open_clip checkpoint files.

The models are tiny and random (seeded, so every call writes the same bytes); the tokenizers are real and work
offline: CLIP's BPE vocabulary (the copy open_clip ships), a Unigram T5 tokenizer trained in memory, MiniLM's own.
The open_clip repos hold a *tiny* `open_clip_config.json` beside their weights: `pretrained='hf-hub:<repo>'` (which
reads the repo's config) builds them; `pretrained=True` (the `openai` tag, open_clip's built-in full-size
architecture) finds the cached weights and refuses them because they do not fit.
"""
from __future__ import annotations
import functools, hashlib, json, os, shutil, tempfile
from pathlib import Path

import torch

HUB_IDS = {"clip-vit-b-16-hf": "openai/clip-vit-base-patch16", "flan-t5-base": "google/flan-t5-base",
           "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
           "clip-vit-b-16-openclip": "timm/vit_base_patch16_clip_224.openai",
           "clip-vit-b-32-openclip": "timm/vit_base_patch32_clip_224.openai",
           "clip-vit-l-14-openclip": "timm/vit_large_patch14_clip_224.openai"}
OPENCLIP = tuple(n for n in HUB_IDS if n.endswith("-openclip"))
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".msgpack", ".h5")  # stored with git LFS on the hub
SEEDS = {name: i for i, name in enumerate(HUB_IDS)}  # different weights per model
T5_CORPUS = ("The quick brown fox jumps over the lazy dog. A cat sat on the mat. It rains; it is dry. "
             "Question: does this imply that an animal sat? entailment not_entailment acceptable unacceptable "
             "positive negative equivalent not_equivalent yes no maybe cola sentence: mrpc rte sst2 qqp qnli mnli")


# --- the tiny models, each written once per process into a staging folder ---------------------------------------
def _clip_tokenizer_files(folder:Path):
    "CLIP's real BPE tokenizer (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json) from open_clip's copy."
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    st = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # the names in OpenAI's vocab.json
    (folder/"vocab.json").write_text(json.dumps({names.get(k, k): i for k, i in st.encoder.items()}))
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    (folder/"merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(str(folder/"vocab.json"), str(folder/"merges.txt"), model_max_length=16).save_pretrained(folder)


def _hf_clip(folder:Path):
    from transformers import CLIPConfig, CLIPModel
    from llora.models import HF_CLIP_TINY, _seeded
    with _seeded(SEEDS["clip-vit-b-16-hf"]): CLIPModel(CLIPConfig(**HF_CLIP_TINY)).save_pretrained(folder)
    _clip_tokenizer_files(folder)


def _t5(folder:Path):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
    from llora.models import T5_TINY, _seeded, untie_lm_head
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator([T5_CORPUS] * 8, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>", show_progress=False)
    tok = T5Tokenizer(vocab=[tuple(v) for v in json.loads(sp.to_str())["model"]["vocab"]])
    with _seeded(SEEDS["flan-t5-base"]):
        model = untie_lm_head(T5ForConditionalGeneration(T5Config(**{**T5_TINY, "vocab_size": len(tok)})))
    model.save_pretrained(folder); tok.save_pretrained(folder)


def _minilm(folder:Path):
    from transformers import AutoTokenizer, BertConfig, BertModel
    from llora.models import _seeded, minilm_path
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    with _seeded(SEEDS["minilm-l6"]): BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)


def _openclip(folder:Path, name:str):
    "An open_clip hub repo's files: open_clip_config.json (the tiny architecture) + open_clip_model.safetensors."
    import open_clip
    from llora.core import save_tensors
    from llora.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TINY_OPENCLIP, TINY_OPENCLIP_CFG, _quiet_root_logger
    from llora.models import _register_tiny_openclip, _seeded
    _register_tiny_openclip()
    cfg = {"model_cfg": TINY_OPENCLIP_CFG, "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}}
    (folder/"open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    with _seeded(SEEDS[name]), _quiet_root_logger():
        clip = open_clip.create_model(TINY_OPENCLIP, pretrained=None, force_quick_gelu=True)
    save_tensors(clip.state_dict(), folder/"open_clip_model.safetensors")


@functools.cache
def _staged() -> dict[str, Path]:
    "Every stand-in written once into a staging folder (removed at exit): model name -> folder."
    from llora.models import _quiet_transformers
    _quiet_transformers()  # no "Writing model shards" bars
    root = Path(tempfile.mkdtemp(prefix="llora-standins-"))
    import atexit; atexit.register(shutil.rmtree, root, ignore_errors=True)
    writers = {"clip-vit-b-16-hf": _hf_clip, "flan-t5-base": _t5, "minilm-l6": _minilm,
               **{n: functools.partial(_openclip, name=n) for n in OPENCLIP}}
    out = {}
    for name, write in writers.items():
        (root/name).mkdir(); write(root/name); out[name] = root/name
    return out


# --- the hub cache layout -----------------------------------------------------------------------------------------
def _etag(path:Path) -> str:
    "The etag huggingface_hub names a blob by: sha256 for git-LFS files, the git blob sha1 otherwise."
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES: return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(cache_dir:str|Path, # a hub cache folder (what HF_HUB_CACHE points at)
                     repo_id:str, # e.g. "google/flan-t5-base"
                     folder:str|Path, # the repo's files
                    ) -> Path:
    "Put `folder`'s files into `cache_dir` as a download of `repo_id` at `main` would; return the snapshot folder."
    folder, repo = Path(folder), Path(cache_dir)/f"models--{repo_id.replace('/', '--')}"
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    etags = {str(f): _etag(folder/f) for f in files}
    commit = hashlib.sha1(json.dumps([repo_id, etags], sort_keys=True).encode()).hexdigest()
    snapshot = repo/"snapshots"/commit
    for f in files:
        blob = repo/"blobs"/etags[str(f)]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists(): shutil.copyfile(folder/f, blob)
        link = snapshot/f
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists(): link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo/"refs").mkdir(parents=True, exist_ok=True)
    (repo/"refs"/"main").write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


def write_hub_cache(cache_dir:str|Path, # a hub cache folder (point HF_HUB_CACHE at it)
                   ) -> dict[str, str]:
    "Write every stand-in into the hub cache `cache_dir`; return model name -> the `pretrained=` hub id that loads it."
    for name, folder in _staged().items(): add_to_hub_cache(cache_dir, HUB_IDS[name], folder)
    return {n: ("hf-hub:" + r if n in OPENCLIP else r) for n, r in HUB_IDS.items()}


def write_local_copies(folder:str|Path, # where to write one sub-folder per model
                      ) -> dict[str, str]:
    "Write every stand-in as a local folder; return model name -> the folder (a `pretrained=` value)."
    out = {}
    for name, staged in _staged().items():
        dest = Path(folder)/name
        shutil.copytree(staged, dest, dirs_exist_ok=True)
        out[name] = str(dest)
    return out


def write_checkpoint_files(folder:str|Path, # where to write the files
                           suffix:str=".safetensors", # ".safetensors", or ".bin" (a torch.save'd state dict)
                          ) -> dict[str, str]:
    "The open_clip stand-ins as single checkpoint files (load with `tiny=True`): model name -> file."
    from safetensors.torch import load_file
    out = {}
    for name in OPENCLIP:
        src, dest = _staged()[name]/"open_clip_model.safetensors", Path(folder)/f"{name}{suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".safetensors": shutil.copyfile(src, dest)
        else: torch.save(load_file(src), dest)
        out[name] = str(dest)
    return out
