"""Which processes are a cell's, judged from a /proc of our own making."""

import os

from mino_jupyter import procs


def _proc(root, pid, *, ppid, uid, start, pgid=None, ns="pid:[4026531836]"):
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    rest = ["S", str(ppid), str(pgid or pid)] + ["0"] * 16 + [str(start)]
    (d / "stat").write_text(f"{pid} (x) " + " ".join(rest) + " 0 0\n")
    (d / "status").write_text(f"Name:\tx\nNSpid:\t{pid}\t{pid - 1000}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(b"x\0")
    os.symlink(ns, d / "ns" / "pid")


def test_only_the_cells_own_shell_may_have_a_parent_outside_the_container(tmp_path):
    ns = "pid:[4026531836]"
    _proc(tmp_path, 1010, ppid=1, uid=1001, start=100)      # the container's init (its parent is outside)
    _proc(tmp_path, 1020, ppid=2, uid=1000, start=500)      # this cell's shell, started by an exec
    _proc(tmp_path, 1021, ppid=1020, uid=1000, start=501)   # its child
    _proc(tmp_path, 1030, ppid=3, uid=1000, start=600)      # another exec's shell (a cell beside it)
    _proc(tmp_path, 1031, ppid=1030, uid=1000, start=601)   # and its child
    _proc(tmp_path, 1040, ppid=1010, uid=1000, start=700)   # something of this cell's, reparented to init
    _proc(tmp_path, 1050, ppid=1010, uid=1000, start=50)    # an earlier cell's server
    found = procs.cell_processes(ns, 500, tmp_path, 1000, leader=1020)
    assert sorted(found) == [1020, 1021, 1040]
    assert sorted(procs.cell_processes(ns, 500, tmp_path, 1000)) == [1040]  # the shell is gone: only via init


def test_an_executor_is_where_its_cells_processes_come_from(tmp_path):
    ns = "pid:[4026531836]"
    _proc(tmp_path, 1010, ppid=1, uid=1001, start=100)      # init
    _proc(tmp_path, 1015, ppid=4, uid=1000, start=200)      # the executor (an exec of its own, older)
    _proc(tmp_path, 1020, ppid=1015, uid=1000, start=500)   # the cell's shell
    _proc(tmp_path, 1021, ppid=1020, uid=1000, start=501)
    assert sorted(procs.cell_processes(ns, 500, tmp_path, 1000, boundary=1015)) == [1020, 1021]
    assert procs.cell_processes(ns, 500, tmp_path, 1000) == {}  # without it: an older process of the uid
    assert procs.host_pid(ns, 20, tmp_path) == 1020  # NSpid's last field is the container's pid
