"""The docs site as a reader's browser shows it: headless Chromium loads each page, runs its scripts (MathJax), and the
rendered DOM is checked: math typeset (no raw TeX left), no leaked Quarto markup, no stderr boxes, the notebook's
outputs and figures present, every local link resolving.

`test_checks_*` render a small site of their own and always run (where Chromium is installed: `make chromium`).
`test_built_site` checks every page of a site built by `llora_docs`; `make docs` runs it with
`LLORA_SITE=_site LLORA_PROC=_proc` after building, and it skips without them."""
import atexit, os, re, shutil, subprocess, tempfile, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest
from bs4 import BeautifulSoup

from llora.docsite import front_matter, prepare_notebook, render_site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed: `make chromium` "
                                "(Debian package chromium, needs apt-get as root)")
# flags as for any headless run on a machine without network: no background connections, no first-run work
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--virtual-time-budget=30000", "--dump-dom"]
TEX = re.compile(r"\$\$|\\\(|\\\[|\$[^$\s][^$\n]{0,300}?\$")
LEAKED = re.compile(r"\]\([^)\s]*\)\{|\{(?:target|style)=|\{\.[\w-]+\}|^:::|#\|", re.M)
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")


_local = threading.local()

def _profile() -> str:
    "One Chromium profile per thread, reused (a new profile costs Chromium 2-3 s at start)."
    if not hasattr(_local, "profile"):
        _local.profile = tempfile.mkdtemp(prefix="llora-chromium-")
        atexit.register(shutil.rmtree, _local.profile, ignore_errors=True)
    return _local.profile


def rendered_dom(page: Path) -> BeautifulSoup:
    "The page's DOM after Chromium ran its scripts (virtual time lets MathJax finish)."
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={_profile()}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "</html>" in r.stdout, f"Chromium failed on {page}: {r.stderr[-2000:]}"
    return BeautifulSoup(r.stdout, "html.parser")


def reader_text(soup: BeautifulSoup) -> str:
    "Text a reader sees as prose: without scripts, styles, code and MathJax's typeset output (removed from `soup`)."
    for el in soup(["script", "style", "pre", "code", "textarea", "noscript"]): el.decompose()
    for el in soup.select('[class^="MathJax"], [class*=" MathJax"], [id^="MathJax"]'): el.decompose()
    return soup.get_text(" ")


def expected_outputs(nb: nbformat.NotebookNode) -> tuple[int, int]:
    "(output areas, images) the page of a processed notebook must show."
    nb = prepare_notebook(nb)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return len(outs), sum(any(t in o.get("data", {}) for t in IMAGE_TYPES) for o in outs)


def has_math(nb: nbformat.NotebookNode) -> bool:
    "Whether the notebook's prose (markdown cells and Markdown outputs such as show_doc's) holds TeX."
    nb = prepare_notebook(nb)
    prose = [c.source for c in nb.cells if c.cell_type == "markdown"]
    prose += [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "text/markdown" in o.get("data", {})]
    return any(TEX.search(re.sub(r"```.*?```|`[^`\n]*`", "", p, flags=re.S)) for p in prose)


def page_problems(page: Path, site: Path, nb: nbformat.NotebookNode | None = None) -> list[str]:
    "Everything wrong with one rendered page (empty when it reads as intended)."
    dom, problems = rendered_dom(page), []
    math = has_math(nb) if nb is not None else bool(TEX.search(reader_text(BeautifulSoup(page.read_text(), "html.parser"))))
    if math:  # the page has math: MathJax must have typeset it, without errors
        if not dom.select(".MathJax, .MathJax_Display, mjx-container"): problems.append("math not typeset")
        if dom.select(".MathJax_Error, .MathJax .noError, .MathJax merror"): problems.append("MathJax errors")
    if dom.select(STDERR): problems.append("stderr/warning box")
    if nb is not None:
        n_out, n_img = expected_outputs(nb)
        shown = len(dom.select(".jp-OutputArea-output"))
        if shown < n_out: problems.append(f"{shown} output areas shown, the notebook has {n_out}")
        imgs = [i for i in dom.select(".jp-OutputArea-output img, .jp-OutputArea-output svg")]
        if len(imgs) < n_img: problems.append(f"{len(imgs)} figures shown, the notebook has {n_img}")
    for img in dom.select("img"):
        src = img.get("src", "")
        if not src or (not src.startswith("data:") and not (page.parent/unquote(urlparse(src).path)).exists()):
            problems.append(f"broken image {src[:60]!r}")
    for a in dom.select("a[href]"):
        url = urlparse(a["href"])
        if url.scheme or url.netloc or not url.path: continue  # external or same-page anchor
        if not (page.parent/unquote(url.path)).resolve().is_file(): problems.append(f"dead link {a['href']!r}")
    if not dom.select("nav.llora-nav a"): problems.append("no navigation bar")
    text = reader_text(dom)  # last: it removes code and typeset math from the DOM
    if m := TEX.search(text): problems.append(f"raw TeX left: {text[max(0, m.start() - 40):m.end() + 40]!r}")
    if m := LEAKED.search(text): problems.append(f"leaked markup: {text[max(0, m.start() - 40):m.end() + 40]!r}")
    if "IProgress not found" in text: problems.append("tqdm warning")
    return problems


def site_problems(site: Path, notebooks: dict) -> dict:
    "`{page name: problems}` for every page of `site` with a problem (2 Chromiums at a time)."
    pages = sorted(site.glob("*.html"))
    with ThreadPoolExecutor(2) as ex:
        found = ex.map(lambda p: (p.name, page_problems(p, site, notebooks.get(p.name))), pages)
        return {name: probs for name, probs in found if probs}


def _png() -> bytes:
    import io
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1, 1)); ax.plot([0, 1], [1, 0])
    buf = io.BytesIO(); fig.savefig(buf, format="png"); plt.close(fig)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    "A processed-notebook folder like `_proc/` with what the real pages have, and its rendered site."
    import base64
    d = tmp_path_factory.mktemp("docs")
    sd = ('---\n\n[source](https://github.com/llora/llora/blob/main/llora/core.py#L3){target="_blank" '
          'style="float:right; font-size:smaller"}\n\n### f\n\n> f(x) with $\\phi_0$')
    lib = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_raw_cell('---\ntitle: "Core: utilities"\noutput-file: core.html\n---\n'),
        nbformat.v4.new_markdown_cell("Inline $\\lambda\\sum_i\\tau_i$ and display\n\n$$f_{\\text{lin}}(x;\\phi) = "
                                      "f(x;\\phi_0) + J(\\phi-\\phi_0)$$\n\nSee [home](https://llora.github.io/llora/index.html)."),
        nbformat.v4.new_code_cell("#| echo: false\n#| output: asis\nshow_doc(f)", outputs=[
            nbformat.v4.new_output("execute_result", data={"text/markdown": sd, "text/plain": "f"}, execution_count=1)]),
        nbformat.v4.new_code_cell("plot()", outputs=[
            nbformat.v4.new_output("stream", name="stderr", text="TqdmWarning: IProgress not found"),
            nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(_png()).decode(),
                                                         "text/plain": "<Figure>"}),
            nbformat.v4.new_output("stream", name="stdout", text="cost = $3 per run")])])
    index = nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell("---\ntitle: llora\n---\n"),
                                            nbformat.v4.new_markdown_cell("# llora\nNo math here, [core](core.html).")])
    proc = d/"proc"; proc.mkdir()
    nbformat.write(lib, proc/"00_core.ipynb"); nbformat.write(index, proc/"index.ipynb")
    render_site(proc, d/"site", site_url="https://llora.github.io/llora")
    return d/"site", {"core.html": lib, "index.html": index}


def test_checks_pass_on_a_good_site(small_site):
    site, notebooks = small_site
    assert site_problems(site, notebooks) == {}
    assert has_math(notebooks["core.html"]) and not has_math(notebooks["index.html"])
    dom = rendered_dom(site/"core.html")
    assert len(dom.select(".MathJax_Display")) == 1 and len(dom.select("script[type^='math/tex']")) >= 3
    assert dom.select_one("a[target=_blank]").get_text() == "source"
    assert dom.select_one("header.llora-title h1").get_text() == "Core: utilities"  # YAML quotes removed
    assert [a.get_text() for a in dom.select("nav.llora-nav a")] == ["Core: utilities", "llora"]


def test_checks_find_what_they_look_for(small_site, tmp_path):
    "Fault injection: each broken variant of the good page is reported with the problem it has."
    site, notebooks = small_site
    shutil.copytree(site, tmp_path/"site")
    page = tmp_path/"site"/"core.html"
    good = page.read_text()
    def problems_of(html, nb=notebooks["core.html"]):
        page.write_text(html); return " | ".join(page_problems(page, tmp_path/"site", nb))
    assert "raw TeX" in problems_of(re.sub(r'<script src="_static/mathjax/[^"]*">', "<script>", good))
    assert "leaked markup" in problems_of(good.replace("Inline", 'Inline [s](x.py){target="_blank"}'))
    stderr = ('<div class="jp-RenderedText" data-mime-type="application/vnd.jupyter.stderr"><pre>warn</pre></div>')
    assert "stderr" in problems_of(good.replace("</main>", stderr + "</main>"))
    assert "figures shown" in problems_of(re.sub(r"<img [^>]*>", "", good))
    assert "dead link" in problems_of(good.replace('href="index.html"', 'href="missing.html"', 1))
    assert "MathJax errors" in problems_of(good.replace("\\sum_i", "\\frac{"))


@pytest.mark.skipif(not os.environ.get("LLORA_SITE"), reason="set LLORA_SITE (and LLORA_PROC) to a site built by "
                    "llora_docs: `make docs` does")
def test_built_site():
    "Every page of the built site; every processed notebook has its page."
    site = Path(os.environ["LLORA_SITE"])
    proc = Path(os.environ.get("LLORA_PROC", "_proc"))
    nbs = {}
    for p in sorted(proc.glob("*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        nbs[front_matter(nb).get("output-file", p.with_suffix(".html").name)] = nb
    assert nbs and set(nbs) <= {p.name for p in site.glob("*.html")}, "pages missing"
    assert sum(expected_outputs(nb)[0] > 0 for nb in nbs.values()) >= len(nbs) // 2, "too few pages with outputs"
    assert site_problems(site, nbs) == {}
