"""The `mino-jupyter` command: what does not need a kernel (doctor, image build, prune, config)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import HelpShown, Parser, add_config_arguments
from .errors import MinoError


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

    prune = sub.add_parser("prune", help="remove containers whose kernel is gone")
    prune.add_argument("--all", action="store_true",
                       help="remove every mino container of this host, live owners included")
    return parser


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
    if args.command == "prune":
        from .cleanup import prune
        from .runtime import Engine

        engine = Engine.connect(notify=lambda m: print(m, file=sys.stderr))
        from .paths import state_dir

        removed = prune(engine, everything=args.all, state=state_dir())
        print(f"removed {len(removed)} container(s)")
        return 0
    raise MinoError(f"unknown command {args.command!r}", "`mino-jupyter --help` lists the commands")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
