"""`%%mino` in a real kernel (jupyter_client) against real Podman."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import give_to_cell
from tests.kernel import Kernel, isolated_env

pytestmark = pytest.mark.podman


def _containers(engine, **labels):
    """Every mino container with these labels (sessions and their firewall containers)."""
    return engine.list({"io.mino.managed": "true", **labels})


def _sessions(engine, token):
    """The session containers of one kernel (a bridge session also has a firewall container)."""
    return [c for c in _containers(engine, **{"io.mino.owner": token})
            if c["Labels"]["io.mino.role"] in ("session", "fresh")]


def _ids(containers):
    return {c["Id"] for c in containers}


def test_fresh_cells_take_a_spare_once_and_only_when_it_fits(kernel, engine):
    """After a --fresh cell, a spare container waits for the next one like it: that cell runs
    in it (nothing of the earlier cell there), it is used once, and a cell with other options
    gets a container of its own while the spare goes. Turning spares off removes the one ready."""
    token = kernel.owner_token()

    def fresh_ids():
        return _ids(_containers(engine, **{"io.mino.owner": token, "io.mino.role": "fresh"}))

    assert kernel.ok("%%mino --fresh\necho one > /tmp/mark; sleep 600 &\necho started").stdout == "started\n"
    def last() -> str:  # the container of the kernel's latest session
        return kernel.container_of(kernel.ok("from mino_jupyter.magics import current_manager as _cm\n"
                                             "print(list(_cm().sessions)[-1])").stdout.strip())

    first, spare = last(), kernel.spare()
    assert spare != first
    r = kernel.ok("%%mino --fresh\ncat /tmp/mark 2>/dev/null || echo clean\npgrep -fx 'sleep 600' || echo no-sleep")
    assert r.stdout == "clean\nno-sleep\n"
    assert last() == spare  # it ran in the spare
    second_spare = kernel.spare()
    assert second_spare not in (first, spare)  # single use
    assert _wait_until(lambda: not fresh_ids() & {first, spare}, 15)
    r = kernel.ok("%%mino --fresh --network none\nls /sys/class/net")
    assert r.stdout == "lo\n"  # its own options, not the spare's bridge
    assert last() != second_spare
    assert _wait_until(lambda: second_spare not in fresh_ids(), 15)  # the spare that did not fit went
    third = kernel.spare()  # a spare like the last cell: --network none
    assert "spare container" in kernel.ok("%mino sessions").stdout
    kernel.ok("%config MinoMagics.prestart = False")
    assert _wait_until(lambda: third not in fresh_ids(), 15)
    kernel.ok("%%mino --fresh --network none\ntrue")
    time.sleep(2)
    assert kernel.ok("from mino_jupyter.magics import current_manager as _cm; print(_cm().spare)").stdout == "None\n"


def _session_path(kernel, attribute, name="default"):
    """A path of a session's storage on this machine (its disk's /tmp, its workspace's upper layer)."""
    from pathlib import Path

    r = kernel.ok(f"from mino_jupyter.magics import current_manager as _cm\n"
                  f"print(_cm().sessions[{name!r}].storage.paths.{attribute})")
    return Path(r.stdout.strip())


def _wait_until(predicate, timeout=30.0, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "notebook-dir"
    ws.mkdir()
    give_to_cell(ws)  # the sandbox user may write next to the "notebook"
    return ws


@pytest.fixture
def kernel(engine, base_image, workspace):
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    k.ok("%load_ext mino_jupyter")
    yield k
    token = k.owner_token()  # a kernel that died during the test fails here, loudly
    k.shutdown()
    assert _wait_until(lambda: not _containers(engine, **{"io.mino.owner": token}), 15)


def test_hardening_seen_from_the_cell(kernel, engine):
    """The process limit is the cgroup's pids.max, or where the engine applies no cgroup limits
    (rootless on cgroup v1) the nproc ulimit."""
    limit = ("cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max"
             if engine.facts().cgroup_limits else "ulimit -u")
    r = kernel.ok(f"%%mino\ngrep -E '^(Cap|NoNewPrivs)' /proc/self/status\n{limit}\nid -u\npwd\n")
    lines = r.stdout.splitlines()
    fields = dict(line.split(":\t") for line in lines if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == "1"
    assert lines[-3:] == ["4096", "1000", "/workspace"]


FORK_LOOP = ("perl -e 'my @kids; while (1) { my $p = fork; last unless defined $p; "
             "if (!$p) { sleep 60; exit 0 } push @kids, $p; last if @kids >= 5000 } "
             "print scalar(@kids), \"\\n\"; kill 9, @kids; 1 while wait != -1'")


def test_a_fork_loop_stops_at_the_process_limit(kernel):
    """A bounded fork loop (it stops by itself at 5,000) hits the 4,096-process limit, whichever
    way this engine applies it, and the session stays usable."""
    r = kernel.ok("%%mino --timeout 120\n" + FORK_LOOP)
    forked = int(r.stdout.split()[-1])
    assert 4000 <= forked < 4096, r.stdout + r.stderr
    assert kernel.ok("%%mino\necho still here").stdout.strip() == "still here"


def test_container_labels_name_the_owner(kernel, engine):
    kernel.ok("%%mino\ntrue")
    token = kernel.owner_token()
    (c,) = _sessions(engine, token)
    labels = c["Labels"]
    from mino_jupyter import __version__

    assert labels["io.mino.owner-pid"] == str(kernel.pid)
    assert labels["io.mino.version"] == __version__
    assert labels["io.mino.session"] == "default"
    assert int(labels["io.mino.owner-start"]) > 0


def test_stdout_and_stderr_stay_apart(kernel):
    r = kernel.ok("%%mino\necho out-1\necho err-1 >&2\necho out-2\n")
    assert r.stdout == "out-1\nout-2\n"
    assert r.cell_stderr == "err-1\n"


def test_lines_stay_whole_and_in_the_order_they_were_written(kernel):
    """ls writes its error in two pieces; the engine reads stdout and stderr apart. What `%%bash`
    shows, mino shows: the whole error line, then `after`; and many interleaved writers never
    split a line."""
    error, after = ("stderr", "ls: cannot access '/nonexistent': No such file or directory\n"), ("stdout", "after\n")
    in_order = 0
    for _ in range(10):
        r = kernel.execute("%%mino --no-raise-error\nls /nonexistent || echo after")
        shown = [(name, "".join(line for line in text.splitlines(True) if not line.startswith("mino: ")))
                 for _t, name, text in r.streams]  # mino's notices may share a stream message
        shown = [(name, text) for name, text in shown if text]
        assert sorted(shown) == sorted([error, after]), shown  # whole, every time
        in_order += shown == [error, after]
    # In the order written, as far as the engine's stream tells it: it reads stdout and stderr
    # apart and, loaded, now and then hands over the later stdout line first (about 1 in 20 seen
    # rootless; never rootful).
    assert in_order >= 6, in_order
    r = kernel.ok("%%mino\nfor i in $(seq 200); do printf 'out-%s-' $i; echo tail; printf 'err-%s-' $i >&2; "
                  "echo tail >&2; done")
    assert r.stdout.splitlines() == [f"out-{i}-tail" for i in range(1, 201)]
    assert [line for line in r.stderr.splitlines() if not line.startswith("mino: ")] == [
        f"err-{i}-tail" for i in range(1, 201)]


def test_a_restarted_session_numbers_its_cells_on_in_the_same_log(kernel):
    kernel.ok("%%mino\necho one")
    kernel.ok("%mino stop default")
    kernel.ok("%%mino\necho two")
    log = kernel.ok("%mino logs default").stdout
    assert log.count("=== cell 1") == 1 and "=== cell 2" in log, log


def _until(kernel, expression: str, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = kernel.ok(f"print(repr({expression}))").stdout.strip()
        if out not in ("None", "'missing'"):
            return out
        time.sleep(0.2)
    raise AssertionError(f"{expression} never filled in")


@pytest.mark.parametrize("flags,script,expected", [
    ("--out output", "echo 'hi'", {"output": "'hi\\n'"}),  # IPython's test_script_bg_out, in mino's form
    ("--err error", "echo 'hello' >&2", {"error": "'hello\\n'"}),  # test_script_bg_err
    ("--out output --err error", "echo 'hi'; echo 'hello' >&2",  # test_script_bg_out_err
     {"output": "'hi\\n'", "error": "'hello\\n'"}),
])
def test_bg_returns_at_once_and_fills_its_variables_when_it_ends(kernel, flags, script, expected):
    started = time.monotonic()
    r = kernel.ok(f"%%mino --bg {flags}\nsleep 1; {script}")
    assert time.monotonic() - started < 1.0 + 5  # the kernel did not wait for the sleep (start included)
    assert "background job 1 started in session 'default'" in r.stdout
    for name, value in expected.items():
        assert _until(kernel, f"globals().get({name!r}, 'missing')") == value


def test_bg_jobs_are_listed_killed_logged_and_end_with_the_kernel(kernel, engine):
    kernel.ok("%%mino --bg\necho started; sleep 300")
    kernel.ok("%%mino --bg --out quick\necho done")
    assert _until(kernel, "globals().get('quick', 'missing')") == "'done\\n'"
    jobs = kernel.ok("%mino jobs").stdout
    assert "1    default  running" in jobs and "2    default  exit 0" in jobs, jobs
    assert kernel.ok("%%mino\necho foreground").stdout == "foreground\n"  # the session is free meanwhile
    r = kernel.ok("%mino kill 1")
    assert r.stdout.strip() == "stopped 1 background job(s): 1"
    assert "1    default  killed" in kernel.ok("%mino jobs").stdout
    assert "started" in kernel.ok("%mino logs default").stdout  # logged like any cell
    r = kernel.ok("%%mino\nps -eo args | grep -c '[s]leep 300' || true")
    assert r.stdout.strip() == "0"  # its processes are gone
    assert "no background job 9" in kernel.execute("%mino kill 9").error_text
    kernel.ok("%%mino --bg\nsleep 300")  # still running when the kernel shuts down: the fixture checks
                                         # that no container is left


def test_long_output_is_capped_in_the_display_and_kept_elsewhere(kernel):
    """`seq 1 200000` hung JupyterLab: the display shows the first 10,000 lines, then one line
    saying how much more there was and where it is; --out keeps everything."""
    r = kernel.ok("%%mino\nseq 1 30000")
    assert r.stdout.splitlines() == [str(i) for i in range(1, 10001)]
    assert "mino: 20,000 more line(s) (" in r.stderr and "`%mino logs default` has them" in r.stderr
    assert "29999" in kernel.ok("%mino logs default --tail 5").stdout  # the log has the end
    kernel.ok("%%mino --out everything\nseq 1 30000")
    assert kernel.ok("print(len(everything.splitlines()))").stdout.strip() == "30000"
    kernel.ok("%config MinoMagics.display_lines = 0")
    r = kernel.ok("%%mino\nseq 1 30000")
    assert len(r.stdout.splitlines()) == 30000 and "not shown" not in r.stderr


def test_output_streams_while_the_cell_runs(kernel, workspace):
    """The cell waits for a file the test creates only after it has seen the first line."""
    kernel.ok("%%mino\ntrue")
    go = _session_path(kernel, "tmp") / "go"  # the session's /tmp, on its disk

    def on_stream(name, text, reply):
        if "waiting" in reply.stdout and not go.exists():
            go.touch()

    r = kernel.execute("%%mino\necho waiting\nfor i in $(seq 300); do [ -e /tmp/go ] && break; sleep 0.1; done\n"
                       "[ -e /tmp/go ] && echo released\n", on_stream=on_stream)
    assert r.error is None, r.error_text
    assert r.stdout == "waiting\nreleased\n"


WAIT_FOR_GO = "for i in $(seq 300); do [ -e /tmp/go ] && break; sleep 0.05; done; rm -f /tmp/go"


def _release_after(kernel, marker: str):
    """A stream callback that lets the cell go on (it waits for /tmp/go) once `marker` was shown:
    what the cell prints next is certainly a separate read."""
    go = _session_path(kernel, "tmp") / "go"

    def on_stream(name, text, reply):
        if marker in reply.stdout and not getattr(on_stream, "sent", False):
            on_stream.sent = True
            go.touch()
    return on_stream


def test_decoding_is_incremental_and_forgiving(kernel):
    kernel.ok("%%mino\ntrue")
    on_stream = _release_after(kernel, "ready")
    r = kernel.execute("%%mino\nprintf 'ready\\n\\xc3'; " + WAIT_FOR_GO + "; printf '\\xa9\\n'\n"
                       "printf 'bad \\xff byte\\n'\nhead -c 300000 /dev/zero | tr '\\0' a; echo\nprintf 'no newline'",
                       on_stream=on_stream)
    assert r.error is None, r.error_text
    assert getattr(on_stream, "sent", False), "the first half never arrived on its own"
    lines = r.stdout.split("\n")
    assert lines[0] == "ready"
    assert lines[1] == "é"  # its two bytes arrived in two reads
    assert lines[2] == "bad \ufffd byte"
    assert lines[3] == "a" * 300000
    assert lines[4] == "no newline"


def test_unloading_keeps_other_extensions_exception_display(engine, base_image, workspace):
    """IPython keeps one custom exception display per shell: mino's must hand others' exceptions
    to the display that was there before it, and put that one back when unloaded."""
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    try:
        k.ok("class Other(Exception):\n    pass\n"
             "get_ipython().set_custom_exc((Other,), lambda shell, et, ev, tb, tb_offset=None: "
             "print('other display') or ['shown by the other display'])")
        k.ok("%load_ext mino_jupyter")
        assert "other display" in k.execute("raise Other()").stdout  # while mino is loaded
        assert "mino: unrecognized arguments: --bogus" in k.execute("%%mino --bogus\ntrue").error_text
        k.ok("%unload_ext mino_jupyter")
        assert "other display" in k.execute("raise Other()").stdout  # and after
    finally:
        k.shutdown()


def test_exit_code_raises_called_process_error(kernel):
    r = kernel.execute("%%mino\necho before; exit 42")
    assert r.stdout == "before\n"
    assert r.error["ename"] == "CalledProcessError"
    assert "exit status 42" in r.error["evalue"]
    assert "magics.py" not in r.error_text and "Traceback" not in r.error_text  # no trace through mino
    r = kernel.ok("import subprocess\ntry:\n    get_ipython().run_cell_magic('mino', '', 'exit 42')\n"
                  "except subprocess.CalledProcessError as e:\n    print('caught', e.returncode)")
    assert r.stdout.strip() == "caught 42"
    kernel.ok("%%mino --no-raise-error\nexit 42")


def test_out_and_err_capture(kernel):
    r = kernel.ok("%%mino --out o --err e\necho to-out; echo to-err >&2")
    assert r.stdout == "" and r.cell_stderr == ""
    r = kernel.ok("print(repr(o), repr(e))")
    assert r.stdout.strip() == "'to-out\\n' 'to-err\\n'"


def test_interrupt_stops_the_whole_process_group(kernel, workspace):
    kernel.ok("%%mino\ntrue")
    ticks = _session_path(kernel, "workspace_upper") / "ticks"  # what the cell writes in /workspace

    def on_stream(name, text, reply):
        if "started" in reply.stdout and not getattr(on_stream, "sent", False):
            on_stream.sent = True
            kernel.km.interrupt_kernel()

    r = kernel.execute("%%mino\necho hello > marker\n"
                       "(while true; do echo tick >> ticks; sleep 0.1; done) &\n"
                       "sleep 0.3; echo started; sleep 100; echo never\n", on_stream=on_stream, timeout=60)
    # Background jobs of a non-interactive shell ignore SIGINT: TERM had to follow.
    assert "Process was terminated." in r.stdout
    assert "never" not in r.stdout
    assert r.error and r.error["ename"] == "CalledProcessError" and "terminated" in r.error["evalue"]
    size = ticks.stat().st_size
    time.sleep(0.6)
    assert ticks.stat().st_size == size, "the background ticker is still running"
    r = kernel.ok("%%mino\ncat marker; ps -eo args | grep -E 'sleep 100|ticks' | grep -v grep || echo none-left")
    assert r.stdout == "hello\nnone-left\n"  # same container, still usable, nothing left over


def test_interrupt_of_a_plain_foreground_command(kernel):
    def on_stream(name, text, reply):
        if "started" in reply.stdout and not getattr(on_stream, "sent", False):
            on_stream.sent = True
            kernel.km.interrupt_kernel()

    r = kernel.execute("%%mino\necho started; sleep 100; echo never\n", on_stream=on_stream, timeout=60)
    assert r.stdout == "started\nProcess was interrupted.\n"
    assert r.error["ename"] == "CalledProcessError" and "exit status 130 (interrupted)" in r.error["evalue"]


def test_timeout_kills_the_group_and_says_so(kernel):
    r = kernel.execute("%%mino --timeout 1\n(sleep 50; echo bg) & echo started; sleep 60; echo never")
    assert r.stdout.startswith("started\n") and "never" not in r.stdout
    assert "timed out after 1 s" in r.stderr
    assert r.error["ename"] == "CalledProcessError" and "124" in r.error["evalue"] and "timed out after 1 s" in r.error["evalue"]
    r = kernel.ok("%%mino\nps -eo args | grep -c '^sleep [56]0' || true")
    assert r.stdout.strip() == "0"


def test_sessions_reuse_separate_and_fresh(kernel, engine):
    kernel.ok("%%mino\necho default > /tmp/where")
    r = kernel.ok("%%mino\ncat /tmp/where")
    assert r.stdout == "default\n"
    r = kernel.ok("%%mino --session other\ncat /tmp/where 2>/dev/null || echo missing")
    assert r.stdout == "missing\n"
    r = kernel.ok("%%mino --fresh\ncat /tmp/where 2>/dev/null || echo missing")
    assert r.stdout == "missing\n"
    token = kernel.owner_token()
    used = kernel.container_of("fresh-1")
    assert _wait_until(lambda: used not in _ids(_containers(engine, **{"io.mino.owner": token, "io.mino.role": "fresh"})), 10)
    assert len(_containers(engine, **{"io.mino.owner": token, "io.mino.role": "session"})) == 2
    kernel.spare()
    table = kernel.ok("%mino sessions").stdout
    header, *rows = table.splitlines()
    assert rows[-1].startswith("(and fresh-2: a spare container for the next --fresh cell")
    rows = rows[:-1]
    assert header.split()[:4] == ["name", "container", "image", "network"]
    states = {row.split()[0]: row for row in rows}
    assert set(states) == {"default", "other", "fresh-1"}
    assert " idle " in states["default"] and " stopped " in states["fresh-1"]


def test_logs_outlive_the_container_and_mask_secrets(kernel, engine):
    kernel.ok("MY_TOKEN = 's3cr3t-value-123'")
    kernel.ok("%%mino\ntrue")
    on_stream = _release_after(kernel, "ready")
    r = kernel.execute("%%mino --secret MY_TOKEN\necho token=$MY_TOKEN\n"
                       "printf 'ready\\n%s' \"${MY_TOKEN:0:6}\"; " + WAIT_FOR_GO + "; printf '%s\\n' \"${MY_TOKEN:6}\"",
                       on_stream=on_stream)
    assert r.error is None and getattr(on_stream, "sent", False)  # the secret arrived in two reads
    assert "s3cr3t-value-123" not in r.stdout and "s3cr3t" not in r.stdout
    assert r.stdout.count("********") == 2
    token = kernel.owner_token()
    (container,) = _sessions(engine, token)
    import json

    assert "s3cr3t" not in json.dumps(engine.inspect(container["Id"]))  # not in the container's config
    kernel.ok("%mino stop default")
    assert _containers(engine, **{"io.mino.owner": token}) == []
    r = kernel.ok("%mino logs default")
    assert "token=********" in r.stdout and "s3cr3t" not in r.stdout
    r = kernel.ok("%mino logs default --tail 1")
    assert r.stdout.startswith("=== exit 0")
    r = kernel.ok("from mino_jupyter.magics import current_manager as _cm\n"
                  "print(open(_cm().sessions['default'].log_path).read().count('s3cr3t'))")
    assert r.stdout.strip() == "0"
    assert "stopped" in kernel.ok("%mino sessions").stdout
    kernel.ok("%mino prune")
    assert "no sessions" in kernel.ok("%mino sessions").stdout


def test_environment_options(kernel):
    r = kernel.ok("%%mino -e GREETING=hi -e 'SPACED=a b'\necho \"$GREETING|$SPACED\"")
    assert r.stdout == "hi|a b\n"
    r = kernel.execute("%%mino -e 1BAD=x\necho no")
    assert r.error and "invalid environment variable" in r.error_text and "Traceback" not in r.error_text


def test_workspace_overlay_changes_and_apply(kernel, workspace):
    (workspace / "input.txt").write_text("from host\n")
    r = kernel.ok("%%mino\ncat input.txt; echo from-cell > output.csv; echo changed > input.txt 2>/dev/null "
                  "|| echo input-is-root-owned")
    assert r.stdout.startswith("from host\n")
    assert not (workspace / "output.csv").exists()  # nothing lands until the user asks
    r = kernel.ok("%mino changes")
    assert "A" in r.stdout and "output.csv" in r.stdout
    r = kernel.ok("%mino apply")
    assert "output.csv: applied" in r.stdout
    applied = workspace / "output.csv"
    assert applied.read_text() == "from-cell\n"
    st = applied.stat()
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o6000  # the kernel's user, no setuid
    assert "output.csv" not in kernel.ok("%mino changes").stdout  # applied: no longer a change
    r = kernel.execute("%%mino --session ro --readonly-workspace\necho x > blocked.txt")
    assert r.error is not None and "Read-only file system" in r.stderr
    assert not (workspace / "blocked.txt").exists()


def test_read_write_workspace_is_an_opt_in_that_says_what_it_allows(kernel, workspace):
    r = kernel.ok("%%mino --session rw --workspace rw\necho direct > direct.txt")
    assert (workspace / "direct.txt").read_text() == "direct\n"
    assert "shares" in r.stderr and "read-write" in r.stderr and "pandas.py" in r.stderr
    r = kernel.ok("%%mino --session rw\ntrue")
    assert "read-write" not in r.stderr  # once per session


def test_bad_options_and_missing_image_start_nothing(kernel, engine):
    token = kernel.owner_token()
    for cell, expected in [
        ("%%mino --bogus\ntrue", "unrecognized arguments: --bogus"),
        ("%%mino --network nope\ntrue", 'unknown network mode "nope"'),
        ("%%mino --timeout -1\ntrue", "--timeout must be a positive number"),
        ("%%mino --session 'bad name'\ntrue", 'invalid session name "bad name"'),
        ("%%mino --image localhost/mino-no-such-image:1\ntrue", "is not present"),
        ("%%mino --network none --network-preset dev\ntrue", "--network none conflicts with --network-preset dev"),
    ]:
        r = kernel.execute(cell)
        assert r.error is not None, cell
        text = r.error_text
        assert expected in text, (cell, text)
        assert "Traceback" not in text and "hint:" in text, text
    assert _containers(engine, **{"io.mino.owner": token}) == []


def test_no_engine_is_one_clear_error(engine, base_image, tmp_path):
    k = Kernel(cwd=str(tmp_path), env={**isolated_env(tmp_path / "mino-home"),
                                       "CONTAINER_HOST": f"unix://{tmp_path}/no-podman.sock"})
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.execute("%%mino\necho hi")
        assert r.error is not None
        assert r.error["traceback"][0].startswith("mino: cannot reach the Podman API at unix://")
        assert "hint:" in r.error_text and "Traceback" not in r.error_text
    finally:
        k.shutdown()


def _kernel_with_two_sessions(engine, workspace):
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    k.ok("%load_ext mino_jupyter")
    k.ok("%%mino\ntrue")
    k.ok("%%mino --session two\ntrue")
    token = k.owner_token()
    assert len(_sessions(engine, token)) == 2
    return k, token


def test_clean_shutdown_removes_containers(engine, base_image, workspace):
    k, token = _kernel_with_two_sessions(engine, workspace)
    k.shutdown(now=False)
    assert _containers(engine, **{"io.mino.owner": token}) == []


def test_restart_and_unload_remove_containers(engine, base_image, workspace):
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    try:
        k.ok("%load_ext mino_jupyter")
        k.ok("%%mino\ntrue")
        token = k.owner_token()
        k.ok("%unload_ext mino_jupyter")
        assert _containers(engine, **{"io.mino.owner": token}) == []
        k.ok("%load_ext mino_jupyter")
        k.ok("%%mino\ntrue")
        token = k.owner_token()
        assert len(_sessions(engine, token)) == 1
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        assert _containers(engine, **{"io.mino.owner": token}) == []
    finally:
        k.shutdown()


def test_a_kernel_shut_down_while_its_default_session_starts_ahead_leaves_nothing(engine, base_image, workspace):
    """The default session starts ahead when the extension loads (the image's home is read
    through a short-lived container first, in a new state directory). A kernel shut down
    meanwhile waits for that start and removes what it made: an exit between a container's
    creation and its removal would leave it behind, with no watchdog to sweep (a clean exit)."""
    from mino_jupyter.cleanup import state_key

    home = workspace.parent / "mino-home"
    k = Kernel(cwd=str(workspace), env=isolated_env(home))
    try:
        k.ok("%load_ext mino_jupyter")
    finally:
        k.shutdown()
    time.sleep(2)  # whatever a start cut short would have left is there by now
    assert _containers(engine, **{"io.mino.state": state_key(home / "state" / "mino")}) == []


def test_sigkilled_kernel_is_cleaned_up_by_the_watchdog(engine, base_image, workspace):
    k, token = _kernel_with_two_sessions(engine, workspace)
    made = len(_containers(engine, **{"io.mino.owner": token}))  # with their firewall containers, if any
    os.kill(k.pid, signal.SIGKILL)
    k.shutdown(now=True)
    assert _wait_until(lambda: not _containers(engine, **{"io.mino.owner": token}), timeout=30), \
        "the watchdog did not remove the dead kernel's containers"
    # ... and it was the watchdog (not another kernel's reaper): its own line says so.
    log = workspace.parent / "mino-home" / "state" / "mino" / "watchdog.log"
    assert _wait_until(lambda: log.exists() and f"kernel {token}" in log.read_text(), timeout=10)
    assert made >= 2 and f"removed {made} container(s)" in log.read_text()


def test_orphans_are_reaped_when_a_kernel_loads(engine, base_image, workspace):
    """A container whose owner is gone (and whose watchdog died too) goes at the next load."""
    import uuid

    from mino_jupyter import policy
    from mino_jupyter.owner import current_owner

    from mino_jupyter.cleanup import state_key

    me = current_owner()
    home = workspace.parent / "mino-home"
    dead = {**me.labels(), "io.mino.owner": "dead" + uuid.uuid4().hex[:8], "io.mino.owner-pid": "999999999",
            "io.mino.state": state_key(home / "state" / "mino")}  # this test's own: no other run reaps it
    spec = policy.session_spec(policy.SessionRequest(
        name=f"mino-orphan-{uuid.uuid4().hex[:6]}", image=base_image, network="none",
        labels=policy.labels("session", dead), limits=engine.host_limits()))
    cid = engine.run(spec)
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    try:
        k.ok("%load_ext mino_jupyter")
        assert _wait_until(lambda: engine.inspect(cid) is None, timeout=20)
        # ... and this kernel's reaper removed it (not a concurrent run's).
        assert _wait_until(lambda: cid in k.ok("from mino_jupyter.magics import current_manager as _cm; "
                                               "print(_cm().cleanup.reaped_ids)").stdout, timeout=10)
    finally:
        k.shutdown()
        engine.remove(cid)


def test_a_script_larger_than_the_argument_limit_runs(kernel):
    filler = "# " + "x" * 998 + "\n"
    r = kernel.ok("%%mino\n" + filler * 150 + "echo \"big script ran as $0\"; touch \"$0\" 2>/dev/null || echo read-only\n")
    if os.environ.get("MINO_EXECUTOR") == "0":  # one exec per cell: handed over as a file
        assert r.stdout.startswith("big script ran as /run/mino/cell-")
        assert r.stdout.endswith("read-only\n")  # which the cell cannot change
    else:  # the executor hands it to bash through a memfd of the cell's own
        assert r.stdout.startswith("big script ran as /dev/fd/3\n")
    r = kernel.ok("%%mino\nls /run/mino | grep -c '^cell-.*[.]sh$' || true")
    assert r.stdout.strip() == "0"  # and removed afterwards


def test_a_home_directory_is_never_written(engine, base_image, tmp_path):
    from mino_jupyter.sessions import CellOptions, SessionManager
    from tests.kernel import Capture

    home = tmp_path / "home"
    home.mkdir()
    give_to_cell(home)
    notices = []
    m = SessionManager(cwd=lambda: home, notice=notices.append, watchdog=False,
                       env={**os.environ, **isolated_env(tmp_path / "mino-home"), "HOME": str(home)})
    try:
        sink = Capture()
        m.run_cell("touch /workspace/.bashrc && echo overlay", CellOptions(workspace="rw"), sink)
        assert "".join(sink.out) == "overlay\n"
        assert any("contains a home directory, so it is never shared read-write" in n for n in notices)
        assert not (home / ".bashrc").exists()
        assert m.sessions["default"].workspace == "overlay"
    finally:
        m.shutdown()


def _prestarted_kernel(engine, workspace):
    """A kernel whose default session was started ahead, when the extension loaded: (kernel, token,
    the prestarted container's id)."""
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    k.ok("%load_ext mino_jupyter")
    token = k.owner_token()
    assert _wait_until(lambda: len(_sessions(engine, token)) == 1, timeout=90), "no session started ahead"
    return k, token, _sessions(engine, token)[0]["Id"]


def test_the_default_session_starts_ahead_and_the_first_cell_takes_it(engine, base_image, workspace):
    k, token, ahead = _prestarted_kernel(engine, workspace)
    try:
        r = k.ok("%%mino\necho first")
        assert r.stdout == "first\n"
        assert [c["Id"] for c in _sessions(engine, token)] == [ahead]  # that container, no other
    finally:
        k.shutdown()


def test_a_session_started_ahead_never_decides_what_the_first_cell_gets(engine, base_image, workspace, tmp_path):
    """The configuration changed between loading and the first cell (the network here, and the
    notebook's directory): the first cell gets exactly what it would have got without starting
    ahead, and the container started ahead is gone."""
    k, token, ahead = _prestarted_kernel(engine, workspace)
    try:
        config = workspace.parent / "mino-home" / "config.toml"
        config.write_text('[container]\nnetwork = "none"\n')
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "marker-elsewhere").write_text("")
        give_to_cell(elsewhere)
        k.ok(f"import os\nos.chdir({str(elsewhere)!r})")
        r = k.ok("%%mino\nip -o -4 addr show | awk '{print $2}'\nls /workspace")
        assert r.stdout.split() == ["lo", "marker-elsewhere"]
        ids = [c["Id"] for c in _sessions(engine, token)]
        assert ahead not in ids and len(ids) == 1
    finally:
        k.shutdown()


def test_no_session_starts_ahead_when_turned_off(engine, base_image, workspace):
    k = Kernel(cwd=str(workspace), env=isolated_env(workspace.parent / "mino-home"))
    try:
        k.ok("%config MinoMagics.prestart = False\n%load_ext mino_jupyter")
        token = k.owner_token()
        time.sleep(3)
        assert _sessions(engine, token) == []
    finally:
        k.shutdown()


def test_a_background_cells_timeout_spares_the_cell_running_beside_it(kernel):
    """Stopping one cell never reaches another cell of the same session that runs beside it (a
    `--bg` cell's timeout while a foreground cell runs: one of them is an exec of its own)."""
    kernel.ok("%%mino --bg --timeout 3\nsleep 100")
    r = kernel.execute("%%mino\necho fg-start; sleep 6; echo fg-survived", timeout=60)
    assert r.stdout == "fg-start\nfg-survived\n", (r.stdout, r.cell_stderr)
    time.sleep(0.5)
    assert "sleep 100" not in kernel.ok("%%mino\nps -eo args").stdout  # the background cell did stop
