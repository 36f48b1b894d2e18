"""The panel in real JupyterLab, in Debian's Chromium driven by Playwright, against real Podman.

Flows:
* open a notebook, load the extension, open the panel, choose the `registries` preset and add
  the test's own server as an extra entry, apply, run a cell that fetches from that server
  (allowed) and from another local port (refused), see both, see the session row with its
  network, click stop, see it stopped;
* the first-run picker and an open panel: a choice in the picker shows in the panel's form, an
  entries-only apply keeps the session (its /tmp file survives), uptime ticks, the log is shown
  once, and no label is clipped or overlaps at 480 and 1400 px.

Screenshots go to test-artifacts/browser/ (compared by eye in review).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tests.kernel import isolated_env
from tests.listeners import TcpListener, wait_port

pytestmark = [pytest.mark.podman, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(request, tmp_path, engine, base_image):
    """JupyterLab on a scratch directory with a mino configuration of its own: bridge chosen, or
    nothing chosen anywhere (a first run, where the picker shows) for tests marked `first_run`."""
    if not os.path.exists(CHROMIUM):
        from tests.conftest import _unavailable

        _unavailable("Debian's chromium is not installed (make test installs it)")
    workdir = tmp_path / "lab"
    workdir.mkdir()
    os.chown(workdir, 1000, 1000)
    port, token = _free_port(), secrets.token_hex(16)
    network = None if request.node.get_closest_marker("first_run") else "bridge"
    env = {**os.environ, **isolated_env(tmp_path / "mino-home", network), "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"), "JUPYTER_DATA_DIR": str(tmp_path / "jdata")}
    settings = tmp_path / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", "--allow-root", f"--ServerApp.root_dir={workdir}",
         f"--LabApp.user_settings_dir={settings}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    if not wait_port(port, 60):
        proc.kill()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield workdir, f"http://127.0.0.1:{port}", token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _write(nb, path: Path) -> None:
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    news = page.get_by_role("button", name="No", exact=True)
    try:
        if news.count() and news.first.is_visible():
            news.first.click(timeout=2_000)  # a "notified about news?" toast would cover the page
    except Exception:
        pass
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _run_cell(page, index: int) -> None:
    """Run one cell, and make sure it did start: a key press that lands while the page is still
    settling (a late kernel dialog) is lost, and the next cell would run without this one."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    before = prompt.inner_text().strip()
    for _ in range(5):
        _dismiss_kernel_dialog(page)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            now = prompt.inner_text().strip()
            if now != before and now not in ("[ ]:", "[]:"):
                return
            page.wait_for_timeout(100)
    raise AssertionError(f"cell {index} did not start (its prompt stayed {before!r})")


def _output(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")


# Every visible widget text in the outputs: no label or button clipped (scrollWidth <= clientWidth),
# no radio label over the next one, nothing past the output area's right edge (the sessions table
# scrolls inside its own box instead).
LAYOUT_PROBLEMS = """() => {
  const bad = [];
  const texts = '.widget-label, .widget-button, .widget-radio-box label, .widget-html-content, textarea, select';
  for (const el of document.querySelectorAll('.jp-OutputArea-output')) {
    const edge = el.getBoundingClientRect().right;
    for (const t of el.querySelectorAll(texts)) {
      const r = t.getBoundingClientRect();
      if (!r.width) continue;
      const what = t.textContent.trim().slice(0, 50);
      if (t.scrollWidth > t.clientWidth + 1) bad.push(`clipped: "${what}" (${t.scrollWidth} > ${t.clientWidth})`);
      if (r.right > edge + 1 && !t.closest('.widget-gridbox')) bad.push(`past the edge: "${what}"`);
    }
    for (const box of el.querySelectorAll('.widget-radio-box')) {
      const rs = [...box.querySelectorAll('label')].map(l => l.getBoundingClientRect());
      for (let i = 1; i < rs.length; i++) if (rs[i].top < rs[i - 1].bottom - 1) bad.push(`radio labels ${i - 1} and ${i} overlap`);
    }
  }
  return bad;
}"""


def _narrow_side_panel_closed(page) -> None:
    """A 480 px window with JupyterLab's file browser closed, as anyone that narrow would."""
    current = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if current.count():
        current.first.click()
        page.wait_for_timeout(300)


def _open(page, url: str, token: str, name: str, frontend: str = "lab") -> None:
    """Open a notebook in JupyterLab (`lab`) or Notebook 7 (`notebook`), served by the same server,
    and wait for its kernel: a kernel dialog may come late on a loaded machine, so look for it
    until the kernel is idle (or, where no indicator shows, 8 s without a dialog)."""
    path = f"lab/tree/{name}" if frontend == "lab" else f"notebooks/{name}"
    page.goto(f"{url}/{path}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    start = time.monotonic()
    while time.monotonic() < start + 60:
        if _dismiss_kernel_dialog(page):
            start = time.monotonic() - 8 + 2  # after a dialog, give the kernel a moment
        elif idle.count() or time.monotonic() > start + 8:
            return
        page.wait_for_timeout(200)


def _dismiss_kernel_dialog(page) -> bool:
    dialog = page.locator(".jp-Dialog")
    try:
        if dialog.count() and dialog.first.is_visible():
            dialog.first.get_by_role("button", name="Select").click(timeout=5_000)
            return True
    except Exception:
        pass
    return False


def test_panel_allowlist_run_and_stop_in_jupyterlab(lab, gateway, engine):
    from playwright.sync_api import expect, sync_playwright

    workdir, url, token = lab
    allowed, other = TcpListener(gateway), TcpListener(gateway)
    entry = f"{gateway}:{allowed.port}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext mino_jupyter"),
        nbformat.v4.new_code_cell("%mino panel"),
        nbformat.v4.new_code_cell(f"%%mino\ncurl -sS -m 5 http://{entry}/\n"
                                  f"curl -sS -m 5 http://{gateway}:{other.port}/ || echo \"refused-$?\""),
    ]
    _write(nb, workdir / "panel.ipynb")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open(page, url, token, "panel.ipynb")
            _run_cell(page, 0)
            _run_cell(page, 1)
            panel = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea")
            preset = panel.locator(".widget-dropdown", has_text="preset").locator("select")
            preset.wait_for(timeout=60_000)
            _shot(page, "1-panel-opened")
            preset.select_option(label="registries")
            mode = panel.locator(".widget-dropdown", has_text="mode").locator("select")
            expect(mode).to_have_value("allowlist")  # choosing a preset means an allowlist
            expect(panel).to_contain_text("pypi.org:443", timeout=10_000)  # the preset's preview
            panel.locator(".widget-textarea textarea").fill(entry)
            panel.get_by_role("button", name="apply to this kernel").click()
            expect(panel).to_contain_text("saved for this kernel", timeout=20_000)
            expect(panel).to_contain_text("allowlist (registries +1)", timeout=10_000)
            _shot(page, "2-allowlist-applied")

            _run_cell(page, 2)
            output = page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-OutputArea")
            expect(output).to_contain_text(allowed.token, timeout=90_000)   # allowed: the server's body
            expect(output).to_contain_text("refused-7", timeout=30_000)     # refused at once
            expect(output).to_contain_text("the allowlist refused 1 connection attempt(s)", timeout=30_000)
            assert allowed.hits == 1 and other.hits == 0
            row = panel.locator(".widget-gridbox")
            expect(row).to_contain_text("default", timeout=20_000)
            expect(row).to_contain_text("allowlist (registries +1)")
            expect(row).to_contain_text("idle")
            _shot(page, "3-cell-ran")

            row.get_by_role("button", name="stop").first.click()
            expect(row).to_contain_text("stopped", timeout=30_000)
            expect(panel).to_contain_text("stopped session 'default'")
            _shot(page, "4-session-stopped")
            browser.close()
    finally:
        allowed.close(), other.close()


@pytest.mark.first_run
@pytest.mark.parametrize("frontend", ["lab", "notebook"])
def test_picker_and_panel_agree_entries_apply_live_and_nothing_is_clipped(lab, gateway, engine, frontend):
    from playwright.sync_api import expect, sync_playwright

    workdir, url, token = lab
    server = TcpListener(gateway)
    entry = f"{gateway}:{server.port}"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext mino_jupyter"),
        nbformat.v4.new_code_cell("%mino panel"),
        nbformat.v4.new_code_cell("%%mino\necho first-cell"),
        nbformat.v4.new_code_cell("%%mino\necho kept-$((6*7)) > /tmp/state; echo wrote-state"),
        nbformat.v4.new_code_cell("%%mino\ncat /tmp/state; echo second-cell"),
    ]
    _write(nb, workdir / "picker.ipynb")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open(page, url, token, "picker.ipynb", frontend)
            _run_cell(page, 0)
            _run_cell(page, 1)
            panel = _output(page, 1)
            mode = panel.locator(".widget-dropdown", has_text="mode").locator("select")
            preset = panel.locator(".widget-dropdown", has_text="preset").locator("select")
            expect(mode).to_have_value("bridge", timeout=60_000)
            _run_cell(page, 2)  # no network chosen anywhere: the cell runs with bridge and the picker shows
            picker = _output(page, 2)
            expect(picker).to_contain_text("first-cell", timeout=90_000)
            expect(picker).to_contain_text("Remember:", timeout=30_000)
            for width in (480, 1400):
                page.set_viewport_size({"width": width, "height": 1000})
                if width == 480:
                    _narrow_side_panel_closed(page)
                picker.scroll_into_view_if_needed()
                page.wait_for_timeout(500)
                _shot(page, f"5-picker-{frontend}-{width}px")
                problems = page.evaluate(LAYOUT_PROBLEMS)
                assert problems == [], f"at {width} px: {problems}"

            picker.locator(".widget-radio-box label", has_text="Allowlist: registries").click()
            picker.get_by_role("button", name="for this kernel").click()
            expect(picker).to_contain_text("saved for this kernel", timeout=20_000)
            expect(mode).to_have_value("allowlist", timeout=10_000)  # the panel follows the picker
            expect(preset).to_have_value("registries")
            expect(panel).to_contain_text("next cell: allowlist (registries)")

            _run_cell(page, 3)
            expect(_output(page, 3)).to_contain_text("wrote-state", timeout=90_000)
            panel.locator(".widget-textarea textarea").fill(entry)
            panel.get_by_role("button", name="apply to this kernel").click()
            expect(panel).to_contain_text("allowlist (registries +1)", timeout=20_000)
            expect(panel).not_to_contain_text("restarts with it")  # entries change live, as cell flags do
            _run_cell(page, 4)
            expect(_output(page, 4)).to_contain_text("second-cell", timeout=60_000)
            expect(_output(page, 4)).to_contain_text("kept-42")  # same container: /tmp kept

            table = panel.locator(".widget-gridbox")
            expect(table).to_contain_text("allowlist (registries +1)", timeout=20_000)
            before = table.inner_text()
            page.wait_for_timeout(2_500)
            assert table.inner_text() != before, "the uptime did not tick"
            table.get_by_role("button", name="logs").first.click()
            expect(panel).to_contain_text("logs of default", timeout=20_000)
            assert panel.inner_text().count("kept-42") == 1  # the log once, not again in the status
            for width in (480, 1400):
                page.set_viewport_size({"width": width, "height": 1000})
                panel.scroll_into_view_if_needed()
                page.wait_for_timeout(500)
                _shot(page, f"6-panel-{frontend}-{width}px")
                problems = page.evaluate(LAYOUT_PROBLEMS)
                assert problems == [], f"at {width} px: {problems}"
            browser.close()
    finally:
        server.close()
