"""A real IPython kernel (jupyter_client) for integration tests."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager


@dataclass
class Reply:
    stdout: str = ""
    stderr: str = ""
    error: dict | None = None
    status: str = ""
    streams: list = field(default_factory=list)  # (monotonic time, name, text)
    displays: list = field(default_factory=list)

    @property
    def cell_stderr(self) -> str:
        """stderr without the once-per-kernel notice of what this engine cannot apply (rootless)."""
        return "".join(line for line in self.stderr.splitlines(keepends=True)
                       if not line.startswith("mino: on this engine, "))

    @property
    def error_text(self) -> str:
        if not self.error:
            return ""
        return "\n".join(self.error.get("traceback", [])) + f"\n{self.error.get('ename')}: {self.error.get('evalue')}"


class Kernel:
    def __init__(self, cwd: str, env: dict | None = None):
        self.km = KernelManager(kernel_name="python3")
        kernel_env = {**os.environ, **(env or {})}
        kernel_env.pop("MINO_REQUIRE_PODMAN", None)
        self.km.start_kernel(cwd=cwd, env=kernel_env, extra_arguments=["--HistoryManager.enabled=False"])
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def execute(self, code: str, timeout: float = 120, on_stream=None, allow_stdin: bool = False) -> Reply:
        """allow_stdin=True is what a person's frontend (JupyterLab) sends; nbclient/nbval send False."""
        msg_id = self.kc.execute(code, allow_stdin=allow_stdin)
        reply = Reply()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no idle status within {timeout} s for: {code[:80]!r}")
            try:
                msg = self.kc.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                reply.streams.append((time.monotonic(), content["name"], content["text"]))
                if content["name"] == "stdout":
                    reply.stdout += content["text"]
                else:
                    reply.stderr += content["text"]
                if on_stream:
                    on_stream(content["name"], content["text"], reply)
            elif kind == "error":
                reply.error = content
            elif kind in ("display_data", "execute_result"):
                reply.displays.append(content)
            elif kind == "status" and content["execution_state"] == "idle":
                break
        shell = self.kc.get_shell_msg(timeout=30)
        reply.status = shell["content"]["status"]
        return reply

    def ok(self, code: str, **kw) -> Reply:
        r = self.execute(code, **kw)
        assert r.error is None, r.error_text + "\nstdout:" + r.stdout + "\nstderr:" + r.stderr
        return r

    def owner_token(self) -> str:
        r = self.ok("from mino_jupyter.magics import current_manager as _cm; print(_cm().owner.token)")
        return r.stdout.strip()

    def container_of(self, session: str) -> str:
        """The container id of one of the kernel's sessions (a --fresh one: `fresh-N`)."""
        return self.ok(f"from mino_jupyter.magics import current_manager as _cm\n"
                       f"print(_cm().sessions[{session!r}].container_id)").stdout.strip()

    def spare(self, timeout: float = 60.0) -> str:
        """The spare container for the next --fresh cell, once it is ready (its executor too, when
        cells go through one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cid = self.ok("from mino_jupyter.magics import current_manager as _cm\n"
                          "s = _cm().spare\nprint(s.container_id if s and (s.executor or not s.executor_mounted)"
                          " else '')").stdout.strip()
            if cid:
                return cid
            time.sleep(0.1)
        raise AssertionError(f"no spare container within {timeout:.0f} s")

    def shutdown(self, now: bool = False) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=now)


def isolated_env(directory, network: str | None = "bridge") -> dict:
    """Config and state of the kernel's own, so tests do not depend on (or touch) the machine's."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.toml"
    if network is not None:
        config.write_text(f'[container]\nnetwork = "{network}"\n')
    return {"MINO_CONFIG": str(config), "XDG_STATE_HOME": str(directory / "state"),
            "XDG_CONFIG_HOME": str(directory / "xdg-config")}


class Capture:
    """An output sink for SessionManager.run_cell that keeps stdout and stderr apart."""

    def __init__(self):
        self.out, self.err = [], []

    def write(self, stream, text):
        (self.err if stream == 2 else self.out).append(text)

    def flush(self):
        pass
