# llora: the two commands of the README are `make main` and `make test`; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
METHOD ?= ties
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: install main test test-notebooks test-pytest check-export docs clean

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
	$(BIN)/papermill nbs/exp_fusion.ipynb $(OUT)/exp_fusion.ipynb -k python3 --cwd nbs -p method $(METHOD) -p out_dir ../$(OUT)/fusion

## every test: generated code matches the notebooks, notebooks run as tests, pytest, and the offline docs build
test: install check-export test-notebooks test-pytest docs

check-export:
	$(BIN)/nbdev_export
	git diff --exit-code -- llora || (echo "llora/ is out of date with nbs/: run nbdev_export" && exit 1)
	test -z "$$(git status --porcelain -- llora)" || (echo "untracked or modified files in llora/: run nbdev_export and commit" && git status --porcelain -- llora && exit 1)

test-notebooks:
	LLORA_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --do_print --timing

test-pytest:
	LLORA_PROGRESS=0 $(BIN)/pytest -q tests

## the docs site: `nbdev_docs` where Quarto is installed, otherwise an offline nbconvert render into _site/
docs: install
	$(BIN)/llora_docs --out _site

clean:
	rm -rf _proc _docs _site $(OUT)
