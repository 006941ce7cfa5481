# llora: the two commands of the README are `make main` and `make test`; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
METHOD ?= ties
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install chromium main test test-notebooks test-pytest check-export docs results cost clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# papermill runs: each cell's printed lines and the progress bars reach the terminal (`--log-output`), a bar every
# 10 s at most (tqdm's TQDM_MININTERVAL). In a kernel without ipywidgets tqdm.auto draws plain text bars, which a
# terminal can show (widgets could not); its warning about that is silenced.
PAPERMILL = PYTHONWARNINGS="ignore:IProgress not found" TQDM_MININTERVAL=10 $(BIN)/papermill --log-output --progress-bar

## the main job: the fusion sweep of one method on the embedded benchmark (offline, CPU)
main: install
	mkdir -p $(OUT)
	$(PAPERMILL) nbs/exp_fusion.ipynb $(OUT)/exp_fusion.ipynb -k python3 --cwd nbs -p method $(METHOD) -p out_dir $(abspath $(OUT))/fusion

## re-run the experiment notebooks in place on the embedded benchmark: the committed outputs, results/embedded/ (~50 min)
## progress goes to the terminal; the committed notebooks keep no stderr log (bars, warnings) and no injected parameters
EXPERIMENTS = exp_finetune exp_fusion exp_similarity exp_disentanglement exp_landscape exp_prompts exp_linear_only report
results: install
	for nb in $(EXPERIMENTS); do \
	  args=""; if [ $$nb = exp_fusion ]; then args="-p method all -p test_examples 128"; fi; \
	  $(PAPERMILL) nbs/$$nb.ipynb nbs/$$nb.ipynb -k python3 --cwd nbs $$args || exit 1; \
	  $(BIN)/python -c "import nbformat as f, sys; p=sys.argv[1]; nb=f.read(p, 4); nb.cells=[c for c in nb.cells if 'injected-parameters' not in c.metadata.get('tags', [])]; [c.update(outputs=[o for o in c.outputs if o.get('name') != 'stderr']) for c in nb.cells if c.cell_type == 'code']; f.write(nb, p)" nbs/$$nb.ipynb || exit 1; \
	done
	$(BIN)/nbdev_clean

## the cost tables (paper Tables 3, 4) for this machine: results/cost/ (~10 min on 2 CPU cores)
cost: install
	LLORA_PROGRESS=0 $(BIN)/papermill nbs/exp_cost.ipynb nbs/exp_cost.ipynb -k python3 --cwd nbs
	$(BIN)/nbdev_clean

## every test: generated code matches the notebooks, notebooks run as tests, pytest, and the offline docs build
test: install chromium check-export test-notebooks test-pytest docs

check-export:
	$(BIN)/nbdev_export
	git diff --exit-code -- llora || (echo "llora/ is out of date with nbs/: run nbdev_export" && exit 1)
	test -z "$$(git status --porcelain -- llora)" || (echo "untracked or modified files in llora/: run nbdev_export and commit" && git status --porcelain -- llora && exit 1)
	$(BIN)/nbdev_clean
	git diff --exit-code -- nbs || (echo "notebooks are not clean: run nbdev_clean and commit" && exit 1)

test-notebooks:
	LLORA_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --do_print --timing

test-pytest:
	LLORA_PROGRESS=0 $(BIN)/pytest -q tests

## the docs site: `nbdev_docs` where Quarto is installed, otherwise an offline nbconvert render into _site/ (the
## library notebooks run for their outputs), then every page checked in headless Chromium
docs: install chromium
	LLORA_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/llora_docs --out _site
	LLORA_SITE=_site LLORA_PROC=_proc $(BIN)/pytest -q tests/test_docs_browser.py -k built_site

## headless Chromium (Debian package) for tests/test_docs_browser.py; where apt-get cannot run, the test skips
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium: not installed (needs apt-get as root); tests/test_docs_browser.py will skip"

clean:
	rm -rf _proc _docs _site $(OUT)
