# llora: the two commands of the README are `make main` and `make test`; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
METHOD ?= ties
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install main test test-notebooks test-pytest check-export docs results cost clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

## the main job: the fusion sweep of one method on the embedded benchmark (offline, CPU)
main: install
	mkdir -p $(OUT)
	$(BIN)/papermill nbs/exp_fusion.ipynb $(OUT)/exp_fusion.ipynb -k python3 --cwd nbs -p method $(METHOD) -p out_dir $(abspath $(OUT))/fusion

## re-run the experiment notebooks in place on the embedded benchmark: the committed outputs, results/embedded/ (~50 min)
EXPERIMENTS = exp_finetune exp_fusion exp_similarity exp_disentanglement exp_landscape exp_prompts report
results: install
	for nb in $(EXPERIMENTS); do \
	  args=""; if [ $$nb = exp_fusion ]; then args="-p method all"; fi; \
	  LLORA_PROGRESS=0 $(BIN)/papermill nbs/$$nb.ipynb nbs/$$nb.ipynb -k python3 --cwd nbs $$args || exit 1; \
	done
	$(BIN)/python -c "import nbformat as f; p='nbs/exp_fusion.ipynb'; nb=f.read(p, 4); nb.cells=[c for c in nb.cells if 'injected-parameters' not in c.metadata.get('tags', [])]; f.write(nb, p)"
	$(BIN)/nbdev_clean

## the cost tables (paper Tables 3, 4) for this machine: results/cost/ (~10 min on 2 CPU cores)
cost: install
	LLORA_PROGRESS=0 $(BIN)/papermill nbs/exp_cost.ipynb nbs/exp_cost.ipynb -k python3 --cwd nbs
	$(BIN)/nbdev_clean

## every test: generated code matches the notebooks, notebooks run as tests, pytest, and the offline docs build
test: install check-export test-notebooks test-pytest docs

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

## the docs site: `nbdev_docs` where Quarto is installed, otherwise an offline nbconvert render into _site/
docs: install
	$(BIN)/llora_docs --out _site

clean:
	rm -rf _proc _docs _site $(OUT)
