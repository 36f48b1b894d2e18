"""A cell lowers the executor's rlimits / nice: do later cells inherit them (no leftover process)?"""
def test_prlimit_steers_later_cells(kernel):
    base = kernel.ok("%%mino\nulimit -n; ulimit -f; ulimit -c; nice; ulimit -t").stdout
    r = kernel.execute("%%mino\nprlimit --pid $PPID --nofile=40:40 --fsize=1:1 --cpu=100:100; renice -n 15 -p $PPID >/dev/null; echo done")
    print("SET", r.stdout, r.stderr)
    later = kernel.execute("%%mino\nulimit -n; ulimit -f; nice; ulimit -t; pgrep -c . ; echo hi > /tmp/x; echo rc=$?")
    print("BASE", base)
    print("LATER", repr(later.stdout), repr(later.stderr), later.error and later.error.get("evalue"))
    later2 = kernel.execute("%%mino\nulimit -n; ulimit -f; nice; echo still")
    print("LATER2", later2.stdout, later2.stderr)
