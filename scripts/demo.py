"""`make demo`: check the stack, then run a hardened hello-world container."""

import sys

from mino_jupyter import policy
from mino_jupyter.doctor import run_checks
from mino_jupyter.errors import MinoError
from mino_jupyter.image import base_image_ref
from mino_jupyter.owner import current_owner
from mino_jupyter.runtime import Engine


def main() -> int:
    print("== mino-jupyter doctor")
    if not run_checks(lambda c: print(c.render(), flush=True)):
        return 1
    print("\n== hello from a hardened container")
    try:
        engine = Engine.connect(notify=print)
        spec = policy.session_spec(policy.SessionRequest(
            name="mino-demo-hello", image=base_image_ref(), network="bridge",
            labels={**policy.version_labels(), **current_owner().labels(), "io.mino.role": "demo"},
            limits=engine.host_limits()))
        cid = engine.run(spec)
        try:
            code, out, err = engine.exec_run(cid, policy.exec_body(
                ["bash", "-c", "echo \"hello from $(hostname) as $(id -un) (uid $(id -u)),"
                 " capabilities: $(grep CapEff /proc/self/status | cut -f2)\""]))
        finally:
            engine.remove(cid)
        sys.stdout.write(out.decode())
        sys.stderr.write(err.decode())
        return code
    except MinoError as exc:
        print(exc.render(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
