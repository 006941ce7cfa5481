"Structure of the experiment notebooks: the papermill parameters cell survives editing and nbdev_clean."
import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
PAPERMILL = [p for p in NBS if p.stem.startswith("exp_") or p.stem in ("paper_results", "report")]


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_every_experiment_notebook_is_found():
    assert {"exp_fusion", "exp_finetune", "exp_similarity", "exp_cost", "report"} <= {p.stem for p in PAPERMILL}


@pytest.mark.parametrize("path", PAPERMILL, ids=lambda p: p.stem)
def test_papermill_parameters_cell(path):
    "Exactly one `parameters` cell, the first code cell, of plain assignments papermill can override; no injected cell."
    cells = code_cells(path)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"{path.name}: parameters cell at code cells {tagged}"
    body = ast.parse(cells[0].source).body
    assert body and all(isinstance(s, ast.Assign) for s in body), f"{path.name}: parameters must be assignments"
    # a committed papermill-injected cell would survive the next papermill run untagged and override its -p values
    injected = [i for i, c in enumerate(cells)
                if "injected-parameters" in c.metadata.get("tags", []) or c.source.startswith("# Parameters")]
    assert not injected, f"{path.name}: papermill-injected cells at code cells {injected}"


@pytest.mark.parametrize("path", [p for p in PAPERMILL if p.stem.startswith("exp_")], ids=lambda p: p.stem)
def test_experiment_notebooks_share_the_common_parameters(path):
    "Every experiment notebook takes `profile`, `device` and `pretrained` (issues 10 and 11), with the same meaning."
    names = {t.id for s in ast.parse(code_cells(path)[0].source).body for t in s.targets if isinstance(t, ast.Name)}
    assert {"profile", "device", "pretrained"} <= names, f"{path.name}: missing {({'profile', 'device', 'pretrained'} - names)}"


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_kernel_is_inferable(path):
    "papermill and JupyterLab find the kernel from the notebook itself (plain `papermill IN OUT`, no `-k`)."
    from papermill.utils import nb_kernel_name, nb_language
    nb = nbformat.read(path, as_version=4)
    assert nb_kernel_name(nb) == "python3" and nb_language(nb) == "python"


def test_plain_papermill_command_line(tmp_path):
    "`papermill nbs/paper_results.ipynb OUT` from the repository root, with no kernel or cwd option, runs to the end."
    import subprocess, sys
    out = tmp_path / "paper_results.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", "nbs/paper_results.ipynb", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "LLORA_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    executed = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" and c.source.strip()]
    assert executed and all(c.execution_count for c in executed)


@pytest.mark.parametrize("path", PAPERMILL, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_with_its_help(path, caplog):
    "`papermill --help-notebook` / `inspect_notebook` parse every parameter line (a comment with `x=\"y\":` broke it)."
    import logging
    pm = pytest.importorskip("papermill")
    names = {t.id for s in ast.parse(code_cells(path)[0].source).body for t in s.targets if isinstance(t, ast.Name)}
    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = pm.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert set(params) == names and all(p["help"] for p in params.values()), f"{path.name}: parameters without help"
