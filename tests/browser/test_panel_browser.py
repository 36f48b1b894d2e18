"""The panel in real JupyterLab, in Debian's Chromium driven by Playwright, against real Podman.

Flow: open a notebook, load the extension, open the panel, choose the `registries` preset and add
the test's own server as an extra entry, apply, run a cell that fetches from that server
(allowed) and from another local port (refused), see both, see the session row with its
network, click stop, see it stopped. Screenshots go to test-artifacts/browser/.
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
from tests.listeners import TcpListener

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
def lab(tmp_path, engine, base_image):
    if not os.path.exists(CHROMIUM):
        from tests.conftest import _unavailable

        _unavailable("Debian's chromium is not installed (make test installs it)")
    workdir = tmp_path / "lab"
    workdir.mkdir()
    os.chown(workdir, 1000, 1000)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, **isolated_env(tmp_path / "mino-home"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield workdir, f"http://127.0.0.1:{port}", token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


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
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, workdir / "panel.ipynb")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/panel.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            dialog = page.locator(".jp-Dialog")
            try:
                dialog.wait_for(timeout=8_000)
                dialog.get_by_role("button", name="Select").click()
            except Exception:
                pass  # the kernel was picked without asking
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                                   ".jp-Toolbar-kernelStatus", timeout=60_000)
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
