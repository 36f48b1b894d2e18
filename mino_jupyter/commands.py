"""The commands' parsers and renderings, shared by `%%mino`/`%mino` and `mino-jupyter`.

Nothing here imports IPython: the magics and the command line both parse with these parsers,
run the config commands through :func:`run_config_command` and print sessions with
:func:`render_sessions`.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UsageError

DEFAULT_SESSION = "default"


class Parser(argparse.ArgumentParser):
    """argparse that raises a :class:`UsageError` (one line and a hint) instead of exiting."""

    def error(self, message: str):
        suggestion = self._nearest(message)
        if suggestion:
            message += f" (did you mean {suggestion}?)"
        if self.prog.startswith("%%"):
            hint = f"`{self.prog}?` shows the options"
        elif self.prog.startswith("%"):
            hint = "`%mino help` lists the commands"
        else:  # the same parsers serve the mino-jupyter command line
            hint = f"`{self.prog} --help` lists the valid arguments"
        raise UsageError(message, hint)

    def _nearest(self, message: str) -> str | None:
        """The option or command closest to what was mistyped (`--netwrok` -> `--network`)."""
        import difflib
        import re

        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            word = unknown.group(1).split("=", 1)[0]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
            return close[0] if close else None
        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            names = [c.strip().strip("'") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), names, n=1, cutoff=0.6)
            return f"'{close[0]}'" if close else None
        return None

    def exit(self, status=0, message=None):  # --help inside a kernel must not exit it
        if message:
            print(message, file=sys.stderr)
        raise HelpShown()


class HelpShown(Exception):
    """--help was printed: nothing else to do (a kernel must not exit)."""


def cell_parser() -> argparse.ArgumentParser:
    p = Parser(prog="%%mino", add_help=True,
                description="Run the cell with bash in a hardened Podman container of this kernel's session.")
    p.add_argument("--session", default=DEFAULT_SESSION, metavar="NAME",
                   help="session (container) to run in; created on first use (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="a one-shot container, removed right after the cell")
    p.add_argument("--bg", action="store_true",
                   help="run the cell in the background: the kernel goes on at once; --out/--err VAR fill in when "
                        "it ends (otherwise its output goes to the session's log); %%mino jobs lists, "
                        "%%mino kill stops")
    p.add_argument("--image", metavar="IMAGE", help="image for a new session (default: the mino base image)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kill the cell's processes after SECONDS (exit 124)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for this cell (repeatable); NAME alone passes the kernel's value")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="pass a secret from a Python variable or the kernel's environment as $NAME; "
                        "its value is masked in output and logs and never stored")
    p.add_argument("--out", metavar="VAR", help="store stdout in the Python variable VAR instead of showing it")
    p.add_argument("--err", metavar="VAR", help="store stderr in the Python variable VAR instead of showing it")
    p.add_argument("--no-raise-error", dest="raise_error", action="store_false",
                   help="do not raise CalledProcessError on a non-zero exit")
    p.add_argument("--network", metavar="MODE", help="bridge (default), host, none or allowlist")
    p.add_argument("--network-preset", metavar="NAME", help="allowlist preset (see %%mino presets)")
    p.add_argument("--network-allow", action="append", metavar="HOST:PORT[,...]",
                   help="allowlist entries (repeatable, comma-separated)")
    p.add_argument("--workspace", choices=("overlay", "ro", "rw"), metavar="MODE",
                   help="how a new session shares the notebook's directory: overlay (default; writes wait "
                        "for %%mino apply), ro, or rw (cells write your files directly)")
    p.add_argument("--readonly-workspace", dest="workspace", action="store_const", const="ro",
                   help="the same as --workspace ro")
    p.add_argument("--memory", metavar="SIZE", help='memory limit of a new session, e.g. 4g')
    p.add_argument("--cpus", metavar="N", help="CPU limit of a new session in cores, e.g. 2 or 0.5")
    p.add_argument("--disk", metavar="SIZE", help="disk limit of a new session (workspace changes, home, /tmp)")
    return p


def line_parser() -> argparse.ArgumentParser:
    p = Parser(prog="%mino", add_help=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.add_parser("help", help="the %%mino options and every command")
    sub.add_parser("sessions", help="this kernel's sessions")
    stop = sub.add_parser("stop", help="stop a session (remove its container); its log stays")
    stop.add_argument("name", nargs="?", metavar="NAME")
    stop.add_argument("--all", action="store_true")
    logs = sub.add_parser("logs", help="a session's output log")
    logs.add_argument("name", nargs="?", default=DEFAULT_SESSION, metavar="NAME")
    logs.add_argument("--tail", type=int, metavar="N")
    changes = sub.add_parser("changes", help="what cells wrote in /workspace, not applied yet")
    changes.add_argument("name", nargs="?", default=DEFAULT_SESSION, metavar="SESSION")
    apply = sub.add_parser("apply", help="copy what cells wrote into the notebook's directory")
    apply.add_argument("items", nargs="*", metavar="[SESSION] PATH")
    apply.add_argument("--session", metavar="NAME", help="the session (default: default)")
    sub.add_parser("jobs", help="background cells (%%%%mino --bg): running and finished")
    kill = sub.add_parser("kill", help="stop background cells")
    kill.add_argument("jobs", nargs="*", type=int, metavar="JOB")
    kill.add_argument("--all", action="store_true")
    sub.add_parser("prune", help="forget stopped sessions; remove containers of dead kernels")
    sub.add_parser("doctor", help="check Podman, the service, the image, the hardening")
    sub.add_parser("presets", help="network presets: names, descriptions, entries")
    cfg = sub.add_parser("config", help="show, get, set or unset settings")
    add_config_arguments(cfg)
    trust = sub.add_parser("trust", help="trust the project .mino.toml's current content")
    trust.add_argument("path", nargs="?", metavar="PATH")
    sub.add_parser("panel", help="the panel: network picker, sessions, logs")
    return p


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`config show|get KEY|set KEY VALUE|unset KEY [--local]`, shared with the command line."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.add_parser("show", help="every setting, its value and the file it comes from")
    get = sub.add_parser("get", help="one setting")
    get.add_argument("key", metavar="KEY")
    set_ = sub.add_parser("set", help="set a value (global config; --local: this project)")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", metavar="VALUE")
    set_.add_argument("--local", action="store_true", help="edit the project .mino.toml")
    unset = sub.add_parser("unset", help="remove a value")
    unset.add_argument("key", metavar="KEY")
    unset.add_argument("--local", action="store_true", help="edit the project .mino.toml")


def run_config_command(args, *, cwd, env, presets, out=print, kernel=None) -> None:
    """The config commands, for %mino config and mino-jupyter config alike."""
    from . import config

    action = args.action or "show"
    if action == "show":
        loaded = config.load(cwd, env, presets)
        for warning in loaded.warnings:
            out(warning)
        for error in loaded.errors:
            out(f"mino: error: {error.message}\n  fix: {error.hint}")
        rows = config.describe(loaded)
        width = max(len(k) for k, _, _ in rows)
        vwidth = max(len(v) for _, v, _ in rows)
        out(f"global file:  {config.global_path(env)}")
        if loaded.project is not None:
            out(f"project file: {loaded.project.path} (trusted)")
        else:
            out("project file: none applies" + (" (not trusted, no effect: " + ", ".join(map(str, loaded.untrusted))
                                                + "; `%mino trust PATH` after review)" if loaded.untrusted else ""))
        if kernel is not None and not kernel.silent:
            said = ", ".join(f"{k} {v}" for k, v in (("network", kernel.network), ("preset", kernel.preset),
                                                    ("allow", ",".join(kernel.allow or ()) or None)) if v)
            out(f"this kernel:  {said} (from {kernel.source}; above both files until the kernel ends)")
        for key, value, source in rows:
            out(f"{key.ljust(width)}  {value.ljust(vwidth)}  {source}")
    elif action == "get":
        key = config.canonical_key(args.key)
        loaded = config.load(cwd, env, presets)
        row = next(r for r in config.describe(loaded) if r[0] == f"{config.SECTION}.{key}")
        out(row[1])
    elif action == "set":
        path, value = config.set_key(args.key, args.value, local=args.local, cwd=cwd, env=env, presets=presets)
        out(f"{config.SECTION}.{config.canonical_key(args.key)} = {config.toml_value(value)} in {path}")
        if args.local and not config.is_trusted(path, path.read_text(encoding="utf-8"), env):
            out(f"note: {path} is not trusted (its other values came from elsewhere); review it, then trust it")
    elif action == "unset":
        path, changed = config.unset_key(args.key, local=args.local, cwd=cwd, env=env)
        key = f"{config.SECTION}.{config.canonical_key(args.key)}"
        out(f"removed {key} from {path}" if changed else f"{key} was not set in {path}")


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def render_sessions(rows: list[dict]) -> str:
    if not rows:
        return "no sessions yet in this kernel (run a %%mino cell)"
    headers = ("name", "container", "image", "network", "cells", "state", "last exit", "started")
    table = [headers] + [(r["name"], r["container"] or "-", r["image"], r["network"], str(r["cells"]),
                          r["state"], "-" if r["last_exit"] is None else str(r["last_exit"]),
                          _fmt_time(r["started"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def render_jobs(jobs: list) -> str:
    """`%mino jobs`: the kernel's background cells (`mino_jupyter.sessions.Job`)."""
    if not jobs:
        return "no background jobs in this kernel (`%%mino --bg` starts one)"
    headers = ("job", "session", "state", "started", "command")
    table = [headers] + [(str(j.number), j.session, j.state + (f": {j.error}" if j.error else ""),
                          _fmt_time(j.started_at), j.command) for j in jobs]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _usage_of(parser: argparse.ArgumentParser) -> str:
    """`NAME ARGS` as a command's own parser spells them (positionals and options)."""
    usage = " ".join(parser.format_usage().split())  # "usage: PROG ARGS", however it wrapped
    args = usage[len("usage: ") + len(parser.prog):]
    return args.replace("[-h]", "").strip()


def commands_help() -> str:
    """Every `%mino` command with its arguments and help, read from the parsers themselves (so
    it cannot drift from what they accept)."""
    lines = ["%mino COMMAND"]
    sub = next(a for a in line_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name, parser in sub.choices.items():
        usage = f"{name} {_usage_of(parser)}".strip()
        if name == "config":
            actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            usage = "config " + " | ".join(f"{a} {_usage_of(p)}".strip() for a, p in actions.choices.items())
        text = (helps.get(name) or "").replace("%%", "%")  # argparse help is %-formatted
        if len(usage) > 26:
            lines += [f"  {usage}", f"  {'':26}{text}"]
        else:
            lines.append(f"  {usage:<26}{text}")
    return "\n".join(lines)


def magic_help() -> str:
    """What `%%mino?` and `%mino help` show: the cell's options and every command."""
    return cell_parser().format_help().rstrip() + "\n\n" + commands_help()
