"""A leftover SIGSTOPs the executor between cells; the next (large) cell with --timeout 2."""
import threading, time

def test_stopped_executor_and_large_cell_ignores_timeout(kernel):
    # leftover: stop the executor 1 s after this cell ended (no pipes held: cell ends at once)
    kernel.ok("%%mino\nE=$PPID; setsid bash -c \"sleep 1; kill -STOP $E\" </dev/null >/dev/null 2>&1 & echo armed")
    time.sleep(2)
    big = "%%mino --timeout 2\n: '" + "A" * 3_000_000 + "'\necho big-done\n"
    interrupted = []
    def interrupter():
        time.sleep(15)
        interrupted.append(time.monotonic())
        kernel.km.interrupt_kernel()
    threading.Thread(target=interrupter, daemon=True).start()
    t0 = time.monotonic()
    r = kernel.execute(big, timeout=60)
    print("BIG took %.1f s, interrupted=%s" % (time.monotonic() - t0, bool(interrupted)))
    print("BIG stdout", repr(r.stdout[:300]), "stderr", repr(r.stderr[-500:]), r.error and r.error.get("ename"))
    t0 = time.monotonic()
    def interrupter2():
        time.sleep(15)
        kernel.km.interrupt_kernel()
    threading.Thread(target=interrupter2, daemon=True).start()
    r = kernel.execute("%%mino --timeout 2\necho small-after", timeout=60)
    print("SMALL took %.1f s" % (time.monotonic() - t0), repr(r.stdout), repr(r.stderr[-400:]), r.error and r.error.get("ename"))
    r = kernel.execute("%%mino --timeout 2\necho third", timeout=60)
    print("THIRD", repr(r.stdout), repr(r.stderr[-400:]), r.error and r.error.get("ename"))
