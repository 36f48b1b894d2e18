"""Building the mino base image, online (FROM a registry image) or offline (debootstrap as
root, mmdebstrap in a user namespace otherwise).

Both ways end in the same recipe (``image/Containerfile``) on top of a Debian bookworm base; the
only difference is where that base comes from. A build is tagged under its final name only after
the result has been checked (capsh, iptables, nft, setsid, the developer user), so a failed or
interrupted build never leaves a half-made image under the name sessions use.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from . import __version__, host, policy
from .errors import ImageBuildError, MinoError, UsageError
from .runtime import Engine

BASE_REPO = "localhost/mino-base"
BOOTSTRAP_REF = "localhost/mino-bootstrap:bookworm"
REGISTRY_BASE = "docker.io/library/debian:bookworm-slim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

Progress = Callable[[str], None]


def base_image_ref(version: str = __version__) -> str:
    return f"{BASE_REPO}:{version}"


@dataclass(frozen=True)
class Variant:
    """A toolchain image built FROM mino-base with its own recipe."""

    name: str
    containerfile: str
    tools: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"localhost/mino-{self.name}:{__version__}"


VARIANTS = {
    "python": Variant("python", "python.Containerfile", ("python3", "pip")),
    "node": Variant("node", "node.Containerfile", ("node", "npm")),
}
SHORT_NAMES = ("base", *VARIANTS)


def resolve_ref(name: str) -> str:
    """A short name (base, python, node) to its local tag; anything else is a full reference."""
    if name in ("base", "mino-base"):
        return base_image_ref()
    if name in VARIANTS:
        return VARIANTS[name].ref
    return name


def variant_of(ref: str) -> Variant | None:
    return next((v for v in VARIANTS.values() if v.ref == ref), None)


def ensure(engine: Engine, ref: str, progress: Progress) -> str:
    """Make sure `ref` exists: mino's own images are built on first use, others must be present.
    Its image id (one look at the engine when it is there: a session start asks once)."""
    info = engine.image_inspect(ref)
    if info is not None:
        return info["Id"]
    variant = variant_of(ref)
    if ref == base_image_ref():
        progress(f"mino: building {ref} (first use; about a minute) ...")
        build_base(engine, progress=progress)
    elif variant is not None:
        progress(f"mino: building {ref} (first use; a minute or two) ...")
        build_variant(engine, variant.name, progress=progress)
    info = engine.image_inspect(ref)
    if info is None:
        engine.require_image(ref)  # says what is missing and how to get it
        raise MinoError(f"image {ref} disappeared while mino was looking at it", "run the cell again")
    return info["Id"]


def build_variant(engine: Engine, name: str, *, force: bool = False, progress: Progress = print) -> str:
    variant = VARIANTS[name]
    if not force and engine.image_exists(variant.ref):
        progress(f"image {variant.ref} is present (use --force to rebuild)")
        return variant.ref
    base = base_image_ref()
    if not engine.image_exists(base):
        build_base(engine, progress=progress)
    started = time.monotonic()
    progress(f"building {variant.ref} FROM {base} ...")
    build_recipe(engine, base=base, target=variant.ref, progress=progress,
                 containerfile=variant.containerfile, tools=REQUIRED_TOOLS + variant.tools)
    progress(f"built {variant.ref} in {time.monotonic() - started:.0f} s")
    return variant.ref


def containerfile_dir() -> Path:
    return Path(str(resources.files("mino_jupyter") / "image"))


@dataclass(frozen=True)
class BuildPlan:
    """Where the base comes from. Pure decision from the user's flags and what is present."""

    source: str  # "local" (use as is), "registry" (pull), "debootstrap"
    base_ref: str


def bootstrap_ref_for(target: str) -> str:
    """The Debian rootfs image an offline build of `target` starts from (its own, for another tag)."""
    if target == base_image_ref():
        return BOOTSTRAP_REF
    repo, _, tag = target.rpartition(":")
    return f"{repo}-bootstrap:{tag}"


def plan_base(*, offline: bool, from_image: str | None, have: Callable[[str], bool],
              bootstrap_ref: str = BOOTSTRAP_REF) -> BuildPlan:
    if offline and from_image:
        raise UsageError("--offline and --from exclude each other",
                         "--offline builds from Debian packages; --from IMAGE builds on IMAGE")
    if from_image:
        return BuildPlan("local" if have(from_image) else "registry", from_image)
    if offline:
        return BuildPlan("local" if have(bootstrap_ref) else "debootstrap", bootstrap_ref)
    if have(REGISTRY_BASE):
        return BuildPlan("local", REGISTRY_BASE)
    if have(bootstrap_ref):
        return BuildPlan("local", bootstrap_ref)
    return BuildPlan("registry", REGISTRY_BASE)


def build_base(engine: Engine, *, offline: bool = False, from_image: str | None = None,
               mirror: str = DEFAULT_MIRROR, force: bool = False,
               progress: Progress = print, target: str | None = None) -> str:
    """Build localhost/mino-base:<version> (or `target`) unless present (or `force`). Returns the
    reference."""
    target = target or base_image_ref()
    if not force and engine.image_exists(target):
        progress(f"image {target} is present (use --force to rebuild)")
        return target
    bootstrap_ref = bootstrap_ref_for(target)
    plan = plan_base(offline=offline, from_image=from_image, have=engine.image_exists, bootstrap_ref=bootstrap_ref)
    started = time.monotonic()
    base = plan.base_ref
    if plan.source == "registry":
        try:
            pull(engine, base, progress)
        except MinoError as exc:
            if from_image:
                raise
            progress(f"no registry reachable ({exc.message}); building offline from Debian packages")
            base = bootstrap(engine, mirror=mirror, progress=progress, ref=bootstrap_ref)
    elif plan.source == "debootstrap":
        base = bootstrap(engine, mirror=mirror, progress=progress, ref=bootstrap_ref)
    progress(f"building {target} FROM {base} ...")
    build_recipe(engine, base=base, target=target, progress=progress)
    progress(f"built {target} in {time.monotonic() - started:.0f} s")
    return target


def pull(engine: Engine, ref: str, progress: Progress, timeout: float = 120) -> None:
    progress(f"pulling {ref} ...")
    error = _follow(engine.pull(ref, timeout), progress, lambda text: "  " + text)
    if error:
        raise ImageBuildError(f"cannot pull {ref}: {error}",
                              "use `mino-jupyter image build --offline` when no registry is reachable")


def _follow(items, progress: Progress, show: Callable[[str], str | None]) -> str | None:
    """Podman's JSON progress stream: each "stream" line through `show` (None hides it); returns
    the last error, if any."""
    error = None
    for item in items:
        if item.get("error"):
            error = item["error"].strip()
        for text in (item.get("stream") or "").splitlines():
            shown = show(text.rstrip())
            if shown:
                progress(shown)
    return error


def bootstrap(engine: Engine, *, mirror: str, progress: Progress, ref: str = BOOTSTRAP_REF) -> str:
    """A minimal Debian rootfs from packages, imported as the build base `ref`: debootstrap as
    root, mmdebstrap in a user namespace (``--mode=unshare``) for everyone else."""
    if os.geteuid() != 0:
        return _bootstrap_unshare(engine, mirror=mirror, progress=progress, ref=ref)
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
    if not debootstrap:
        raise ImageBuildError("debootstrap is not installed",
                              "apt-get install debootstrap (and debian-archive-keyring on Ubuntu)")
    with tempfile.TemporaryDirectory(prefix="mino-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        progress(f"debootstrap {SUITE} from {mirror} (about a minute) ...")
        _stream_command([debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror], progress,
                        failure="debootstrap failed")
        progress(f"importing the rootfs as {ref} ...")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            engine.import_image(ref, _chunks(tar.stdout))
        finally:
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0:
            engine.remove_image(ref)
            raise ImageBuildError("packing the rootfs failed", "check free disk space and rerun")
    return ref


def _find_tool(name: str) -> str | None:
    """`name` on PATH, else in the sbin/bin directories a normal user's PATH may lack."""
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)
    return next((p for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
                 if os.access(p := os.path.join(d, name), os.X_OK)), None)


def check_subids(user: str, uid: int, files: tuple[str, ...] = host.SUBID_FILES,
                 read: Callable[[str], str | None] | None = None) -> None:
    """Rootless builds map the rootfs's users to the user's subordinate IDs; without a range
    (or with too small a one) mmdebstrap and Podman fail later with obscure messages."""
    problem = host.subordinate_ids_problem(user, uid, files, read, purpose="a rootless offline build")
    if problem:
        raise ImageBuildError(problem.message, problem.hint)


def mmdebstrap_command(mmdebstrap: str, mirror: str, out: str) -> list[str]:
    """The rootfs as a tarball, built in a user namespace: no root, no device files on disk."""
    return [mmdebstrap, "--mode=unshare", "--variant=minbase", SUITE, out, mirror]


def _show_mmdebstrap(line: str) -> bool:
    """Its steps, warnings and errors; not its bookkeeping (temporary directories and the like)."""
    return line.startswith(("I: ", "W: ", "E: ")) and not line.startswith(
        ("I: chroot architecture", "I: finding correct signed-by", "I: using ", "I: removing tempdir"))


def _bootstrap_unshare(engine: Engine, *, mirror: str, progress: Progress, ref: str) -> str:
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    mmdebstrap = _find_tool("mmdebstrap")
    if not mmdebstrap:
        raise ImageBuildError("mmdebstrap is not installed (a rootless offline build needs it)",
                              "apt-get install mmdebstrap uidmap")
    if not (_find_tool("newuidmap") and _find_tool("newgidmap")):
        raise ImageBuildError("newuidmap/newgidmap are not installed (a rootless offline build needs them)",
                              "apt-get install mmdebstrap uidmap")
    check_subids(user, uid)
    with tempfile.TemporaryDirectory(prefix="mino-rootfs-") as tmp:
        out = Path(tmp) / "rootfs.tar"
        progress(f"mmdebstrap {SUITE} from {mirror} in a user namespace (about a minute) ...")
        _stream_command(mmdebstrap_command(mmdebstrap, mirror, str(out)), progress,
                        failure="mmdebstrap failed", show=_show_mmdebstrap)
        progress(f"importing the rootfs as {ref} ...")
        with open(out, "rb") as stream:
            engine.import_image(ref, _chunks(stream))
    return ref


def _chunks(stream, size: int = 1 << 20):
    while chunk := stream.read(size):
        yield chunk


def _stream_command(cmd: list[str], progress: Progress, *, failure: str,
                    show: Callable[[str], bool] | None = None) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    tail: list[str] = []
    assert proc.stdout
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-5:]
        if show is not None:
            if show(line):
                progress("  " + line)
        elif line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking",
                              "I: Configuring", "I: Installing", "I: Base", "E:", "W:")):
            if not line.startswith(("I: Retrieving", "I: Validating", "I: Extracting")) or "Release" in line:
                progress("  " + line)
    if proc.wait() != 0:
        raise ImageBuildError(f"{failure} (exit {proc.returncode}): {' | '.join(tail[-2:])}",
                              "check that the Debian mirror is reachable (`apt-get update`) and rerun")


def _context_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(containerfile_dir().iterdir()):
            if path.is_file() and not path.name.startswith(("_", ".")):
                tar.add(str(path), arcname=path.name)
    return buf.getvalue()


def build_recipe(engine: Engine, *, base: str, target: str, progress: Progress,
                 containerfile: str = "Containerfile", tools: tuple[str, ...] | None = None) -> None:
    candidate = f"{target}-candidate"
    params = {
        "dockerfile": containerfile,
        "t": candidate,
        "buildargs": json.dumps({"BASE": base, "MINO_VERSION": __version__}),
        "pull": "false",
        "rm": "true",
        "forcerm": "true",
        "layers": "true",
    }
    packages = 0

    def show(text: str) -> str | None:
        nonlocal packages
        if text.startswith("Setting up "):
            packages += 1
            return f"  ... {packages} packages set up" if packages % 25 == 0 else None
        if text.startswith(("STEP", "COMMIT", "Successfully", "Err:", "E:")):
            return "  " + text[:160]
        return None

    error = _follow(engine.build(params, _context_tar()), progress, show)
    if error or not engine.image_exists(candidate):
        _discard(engine, candidate)
        raise ImageBuildError(f"building {target} failed: {error or 'no image produced'}",
                              "read the build output above; rerun with --force once fixed")
    try:
        verify_image(engine, candidate, tools or REQUIRED_TOOLS)
    except MinoError:
        _discard(engine, candidate)
        raise
    _tag(engine, candidate, target)
    _untag(engine, candidate)


REQUIRED_TOOLS = ("bash", "capsh", "iptables", "nft", "setsid", "curl", "ip", "ps")


def verify_image(engine: Engine, ref: str, tools: tuple[str, ...] = REQUIRED_TOOLS) -> None:
    """Run the image once, hardened, and check what sessions and the firewall rely on."""
    check = ("set -e; for t in " + " ".join(tools) + "; do command -v $t >/dev/null "
             "|| { echo missing:$t; exit 3; }; done; test \"$(id -u developer)\" = 1000; "
             "test -d /workspace && test -O /workspace; echo ok")
    probe = run_probe(engine, ref, check, role="verify", network="none")
    code, out, err = probe.code, probe.out, probe.err
    if code != 0:
        raise ImageBuildError(f"image {ref} lacks what mino needs: {(out + err).decode(errors='replace').strip()}",
                              "the recipe is mino_jupyter/image/Containerfile; rebuild with --force")


@dataclass(frozen=True)
class Probe:
    container: str  # removed by the time the probe returns
    code: int
    out: bytes
    err: bytes


def run_probe(engine: Engine, ref: str, script: str, *, role: str, network: str,
              seccomp_profile: str | None = None) -> Probe:
    """One hardened container (the session policy), one bash script in it, then removed.
    Used to check an image (``verify``) and the hardening an engine applies (``doctor``)."""
    from .owner import current_owner

    spec = policy.session_spec(policy.SessionRequest(
        name=f"mino-{role}-{os.getpid()}-{int(time.time() * 1000) % 100000}", image=ref,
        network=network, labels=policy.labels(role, current_owner().labels()),
        limits=engine.host_limits(), seccomp_profile=seccomp_profile, engine=engine.facts()))
    cid = engine.run(spec)
    try:
        code, out, err = engine.exec_run(cid, policy.probe_exec(script))
    finally:
        engine.remove(cid)
    return Probe(cid, code, out, err)


def _tag(engine: Engine, source: str, target: str) -> None:
    engine.tag(source, target)


def _discard(engine: Engine, ref: str) -> None:
    engine.remove_image(ref)


def _untag(engine: Engine, ref: str) -> None:
    if engine.image_exists(ref):
        engine.untag(ref)
