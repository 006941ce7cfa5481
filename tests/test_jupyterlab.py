"""JupyterLab smoke test: a headless `jupyter lab` server opens a library notebook and an experiment notebook the way
the Lab front end does (contents API, then a session whose kernel is the notebook's kernelspec), and every code cell
runs through the kernel websocket without an error. `IN_TEST=1` in the server's environment gives the kernels
`nbdev_test`'s fast settings (the experiment notebooks switch to their smoke profile)."""
import json, os, secrets, socket, subprocess, sys, tempfile, time, uuid
from pathlib import Path
from urllib.request import Request, urlopen

import pytest

websocket = pytest.importorskip("websocket", reason="websocket-client (a jupyter_server dependency) is not installed")
pytest.importorskip("jupyterlab", reason="jupyterlab (a dev requirement) is not installed")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["nbs/00_core.ipynb", "nbs/exp_similarity.ipynb"]
SKIP_FLAGS = {"notest", "slow"}  # settings.ini tst_flags: cells nbdev_test does not run either


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Lab:
    "A JupyterLab server on a free local port with a token, in its own runtime and config folders."
    def __init__(self, tmp: Path):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        env = {**os.environ, "IN_TEST": "1", "LLORA_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "JUPYTER_RUNTIME_DIR": str(tmp/"runtime"), "JUPYTER_CONFIG_DIR": str(tmp/"config"),
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.log = open(tmp/"lab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
             f"--port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={ROOT}"], env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", body=None, timeout: float = 30):
        req = Request(self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                      headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def wait_ready(self, timeout: float = 90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"jupyter lab exited: {Path(self.log.name).read_text()[-3000:]}"
            try: return self.api("/api/status", timeout=5)
            except OSError: time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer in {timeout} s: {Path(self.log.name).read_text()[-3000:]}")

    def close(self):
        self.proc.terminate()
        try: self.proc.wait(15)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def lab():
    with tempfile.TemporaryDirectory() as d:
        server = Lab(Path(d))
        try:
            server.wait_ready()
            yield server
        finally:
            server.close()


def _skipped(source: str) -> bool:
    flags = {line.split("#|", 1)[1].strip().split(":")[0].strip() for line in source.splitlines()
             if line.strip().startswith("#|")}
    return bool(flags & SKIP_FLAGS) or "eval: false" in source


def run_cells(lab: Lab, kernel_id: str, cells: list, timeout: float) -> list:
    "Execute the cells in order over the kernel websocket; return the errors (empty when every cell ran)."
    session = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?session_id={session}",
                                     header=[f"Authorization: token {lab.token}"], timeout=timeout)
    errors, deadline = [], time.time() + timeout
    try:
        for i, source in enumerate(cells):
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                                           "username": "test", "version": "5.3"},
                                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                                "content": {"code": source, "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
            while True:
                ws.settimeout(max(1.0, deadline - time.time()))
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id: continue
                # the shell channel's reply carries the error too; iopub's `error` message can arrive before or after it
                if msg["header"]["msg_type"] == "execute_reply":
                    c = msg["content"]
                    if c["status"] != "ok": errors.append(f"cell {i}: {c.get('ename', c['status'])}: {c.get('evalue', '')}")
                    break
            if errors: break
    finally:
        ws.close()
    return errors


def test_errors_are_reported(lab):
    "Fault injection: a failing cell is reported with its error, and no later cell runs."
    kernel = lab.api("/api/kernels", "POST", {"name": "python3"})
    try:
        errors = run_cells(lab, kernel["id"], ["x = 1", "1/0", "open('never', 'w')"], timeout=60)
        assert errors == ["cell 1: ZeroDivisionError: division by zero"]
        assert not (ROOT/"never").exists()
    finally:
        lab.api(f"/api/kernels/{kernel['id']}", "DELETE")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: Path(p).stem)
def test_notebook_opens_and_runs(lab, path):
    "Opened through the contents API, its kernelspec resolves (no kernel prompt); all its cells run without error."
    model = lab.api(f"/api/contents/{path}?content=1&type=notebook")
    assert model["type"] == "notebook" and model["content"]["cells"]
    kernel_name = model["content"]["metadata"]["kernelspec"]["name"]
    specs = lab.api("/api/kernelspecs")["kernelspecs"]
    assert kernel_name in specs, f"{path}: kernelspec {kernel_name!r} unknown to the server (Lab would ask): {list(specs)}"
    sess = lab.api("/api/sessions", "POST", {"path": path, "type": "notebook", "name": Path(path).name,
                                             "kernel": {"name": kernel_name}})
    try:
        assert sess["kernel"]["name"] == kernel_name
        cells = [c["source"] for c in model["content"]["cells"] if c["cell_type"] == "code" and not _skipped(c["source"])]
        assert run_cells(lab, sess["kernel"]["id"], cells, timeout=240) == []
    finally:
        lab.api(f"/api/sessions/{sess['id']}", "DELETE")
    assert sess["kernel"]["id"] not in {k["id"] for k in lab.api("/api/kernels")}, "kernel still running"
