import os, threading, time
def test_size(kernel):
    n = int(os.environ.get("SZ", "300000"))
    kernel.ok("%%mino\nE=$PPID; setsid bash -c \"sleep 1; kill -STOP $E\" </dev/null >/dev/null 2>&1 & echo armed")
    time.sleep(2)
    threading.Thread(target=lambda: (time.sleep(12), kernel.km.interrupt_kernel()), daemon=True).start()
    t0 = time.monotonic()
    r = kernel.execute("%%mino --timeout 2\n: '" + "A" * n + "'\necho big-done\n", timeout=60)
    print("SIZE", n, "took %.1f" % (time.monotonic() - t0), r.error and r.error.get("ename"), repr(r.stderr[-300:]))
