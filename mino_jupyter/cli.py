"""The `mino-jupyter` command: what does not need a kernel (doctor, image build, prune, config)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import HelpShown, Parser, add_config_arguments, cell_parser
from .errors import MinoError, UsageError

# The `%%mino` options that shape a new session, reused (declared once, in commands.cell_parser)
# by `mino-jupyter kube`, with the help of the two whose meaning a Pod changes.
KUBE_SESSION_OPTIONS = ("--session", "--image", "--timeout", "--network", "--network-preset", "--network-allow",
                        "--memory", "--cpus", "--disk")
KUBE_HELP = {
    "--session": "the session: the Pod is named mino-NAME (default: %(default)s)",
    "--timeout": "the Pod's activeDeadlineSeconds: it is stopped SECONDS after it starts (default: 8 hours)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mino-jupyter", description="Hardened Podman sandboxes for notebook cells.")
    parser.add_argument("--version", action="version", version=f"mino-jupyter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    sub.add_parser("doctor", help="check Podman, the API service, the base image and the hardening")

    image = sub.add_parser("image", help="build or inspect mino images")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION", parser_class=Parser)
    build = image_sub.add_parser("build", help="build mino images: base (default), python, node")
    build.add_argument("names", nargs="*", metavar="NAME", help="base, python, node (default: base)")
    how = build.add_mutually_exclusive_group()
    how.add_argument("--offline", action="store_true",
                     help="build from Debian packages (debootstrap as root, mmdebstrap --mode=unshare "
                          "without root), no container registry needed")
    how.add_argument("--from", dest="from_image", metavar="IMAGE",
                     help="build on IMAGE (a Debian bookworm image) instead of debian:bookworm-slim")
    build.add_argument("--mirror", default=None, metavar="URL", help="Debian mirror for --offline")
    build.add_argument("--force", action="store_true", help="rebuild even when the image exists")
    build.add_argument("--tag", metavar="REF", help="build the base under another name (to try a build without "
                                                    "touching the one sessions use); an offline build then makes "
                                                    "its own REPO-bootstrap:TAG rootfs image")

    cfg = sub.add_parser("config", help="show, get, set or unset settings (--local: the project's .mino.toml)")
    add_config_arguments(cfg)
    trust = sub.add_parser("trust", help="trust the project .mino.toml's current content")
    trust.add_argument("path", nargs="?", help="default: the nearest .mino.toml from here")
    sub.add_parser("presets", help="network presets: names, descriptions, entries")

    kube = sub.add_parser("kube", help="write a session as a Kubernetes Pod manifest (YAML); talks to no cluster",
                          description="Write a session as a Kubernetes Pod: the same hardening, limits and "
                                      "firewall as a Podman session (README: Running containers elsewhere).")
    add_kube_arguments(kube)

    prune = sub.add_parser("prune", help="remove containers whose kernel is gone")
    prune.add_argument("--all", action="store_true",
                       help="remove every mino container of this host, live owners included, and mino's "
                            "support volumes no container uses")
    return parser


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    import copy

    for action in cell_parser()._actions:
        if set(action.option_strings) & set(KUBE_SESSION_OPTIONS):
            action = copy.copy(action)
            action.help = KUBE_HELP.get(action.option_strings[-1], action.help)
            parser._add_action(action)  # what argparse's `parents=` does, for a chosen few
    parser.add_argument("--cluster-dns", action="append", default=[], metavar="ADDRESS[,...]",
                        help="bridge only: the cluster DNS Service's address(es), whose port 53 stays open "
                             "(every other private address is refused)")
    parser.add_argument("--firewall-image", metavar="IMAGE",
                        help="image of the firewall init container (default: the mino base image; "
                             "it needs nft and perl)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the manifest to FILE instead of stdout")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _dispatch(args)
    except HelpShown:
        return 0
    except MinoError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mino: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "doctor":
        from .doctor import run_checks

        ok = run_checks(lambda check: print(check.render(), flush=True))
        return 0 if ok else 1
    if args.command == "image":
        if args.image_command != "build":
            raise MinoError("missing action for `image`", "use `mino-jupyter image build [--offline]`")
        from .image import DEFAULT_MIRROR, SHORT_NAMES, build_base, build_variant
        from .runtime import Engine

        names = args.names or ["base"]
        unknown = [n for n in names if n not in SHORT_NAMES]
        if unknown:
            raise MinoError(f"unknown image {unknown[0]!r}", f"valid names: {', '.join(SHORT_NAMES)}")
        engine = Engine.connect(notify=lambda m: print(m, file=sys.stderr))

        def progress(message: str) -> None:
            print(message, flush=True)

        if args.tag and names != ["base"]:
            raise MinoError("--tag names the base image only", "use `mino-jupyter image build --tag REF` alone")
        if "base" in names or args.offline or args.from_image:
            print(build_base(engine, offline=args.offline, from_image=args.from_image,
                             mirror=args.mirror or DEFAULT_MIRROR, force=args.force and "base" in names,
                             progress=progress, target=args.tag))
        for name in names:
            if name != "base":
                print(build_variant(engine, name, force=args.force, progress=progress))
        return 0
    if args.command == "config":
        from pathlib import Path

        from . import presets
        from .commands import run_config_command

        run_config_command(args, cwd=Path.cwd(), env=None, presets=presets.entries(presets.load()))
        return 0
    if args.command == "trust":
        from pathlib import Path

        from . import config

        print(config.trust_project(Path(args.path) if args.path else None, Path.cwd())[1])
        return 0
    if args.command == "presets":
        from . import presets

        print(presets.render(presets.load()))
        return 0
    if args.command == "kube":
        return _kube(args)
    if args.command == "prune":
        from .cleanup import prune
        from .runtime import Engine

        engine = Engine.connect(notify=lambda m: print(m, file=sys.stderr))
        from .paths import state_dir

        removed = prune(engine, everything=args.all, state=state_dir())
        print(f"removed {len(removed)} container(s)")
        return 0
    raise MinoError(f"unknown command {args.command!r}", "`mino-jupyter --help` lists the commands")


def _kube(args) -> int:
    """Gather what the Pod needs (the configuration, the network plan, the allowed names'
    addresses, resolved now on this machine) and write :func:`mino_jupyter.kube.render`."""
    import time
    from pathlib import Path

    from . import config, firewall, kube, presets
    from .image import base_image_ref, resolve_ref
    from .network import NetworkChoice, NetworkResolutionInput, resolve

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731 - stdout is the manifest's
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.force:
        raise UsageError(f"{output} exists; the manifest was not written", "add --force to overwrite it")
    deadline = kube.deadline(args.timeout)
    kube.check_session(args.session)
    entries = presets.entries(presets.load())
    loaded = config.load(Path.cwd(), None, entries)
    for warning in loaded.warnings:
        say(warning)
    loaded.require_usable()
    resolution = resolve(NetworkResolutionInput(
        flags=NetworkChoice("cell flags", args.network, args.network_preset,
                            tuple(args.network_allow) if args.network_allow else None),
        project=config.network_choice(loaded.project, "project"),
        global_=config.network_choice(loaded.global_, "global")), entries)
    for warning in resolution.warnings:
        say(f"mino: {warning}")
    plan = resolution.plan
    cluster_dns = kube.check_plan(plan, args.cluster_dns)
    resources = kube.resources(args.memory, args.cpus, args.disk, loaded)
    resolved = firewall.resolve_entries(plan.allow) if plan.allow else firewall.Resolved()
    if resolved.unresolved:
        say("mino: no address for " + ", ".join(resolved.unresolved) + " on this machine; they stay unreachable "
            "from the Pod")
    request = kube.KubeRequest(
        session=args.session, image=resolve_ref(args.image or config.merged(loaded, "image")[0] or "base"),
        firewall_image=args.firewall_image or base_image_ref(), plan=plan, resolved=resolved,
        resources=resources, deadline=deadline,
        cluster_dns=cluster_dns, resolved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if plan.allow else None)
    text = kube.render(request)
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(output, "w" if args.force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise UsageError(f"{output} exists; the manifest was not written", "add --force to overwrite it") from None
    except OSError as exc:
        raise MinoError(f"could not write {output}: {exc.strerror}") from None
    say(f"mino: wrote {output}: Pod {kube.POD_PREFIX}{args.session}, network {plan.describe()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
