"""What a new session will be: the kernel's choices, the configuration, and the cell's flags.

One :class:`Choices` per kernel. It reads the configuration (the global file and the nearest
trusted project file, :mod:`config`), the presets, and the kernel-level choices
(``%config MinoMagics.*``, the first-run picker's "for this kernel"), and answers: which
network plan (decided by :mod:`network`), which image, which workspace mode, which limits. It
also saves choices to files (the picker, the panel) and trusts project files. It starts nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from . import config, host, image as images, policy, presets as presets_mod
from .errors import UsageError
from .network import NetworkChoice, NetworkPlan, NetworkResolutionInput, Resolution, resolve

Notice = Callable[[str], None]
SCOPES = ("session", "project", "global")


def size_text(value: int) -> str:
    return f"{value / policy.GIB:g} GiB" if value >= policy.GIB else f"{value // policy.MIB} MiB"


class Choices:
    def __init__(self, cwd: Callable[[], Path], env: Mapping[str, str] | None, state: Path, notice: Notice):
        self.cwd = cwd
        self.env = env
        self.state = state  # where sessions' disks live (their free space bounds the disk limit)
        self.notice = notice
        # Kernel-level choices: %config MinoMagics.*, the picker's "for this kernel".
        self.network: NetworkChoice | None = None
        self.image: str | None = None
        self.workspace: str | None = None
        self.first_run_done = False
        self._shown: set[str] = set()

    # ------------------------------------------------------------------ reading
    def presets(self) -> dict:
        return presets_mod.entries(presets_mod.load(env=self.env))

    def settings(self, presets: dict | None = None) -> config.Loaded:
        return config.load(self.cwd(), self.env, self.presets() if presets is None else presets)

    def warn_once(self, loaded: config.Loaded) -> None:
        """The files' warnings, once per kernel (not at every cell)."""
        for warning in loaded.warnings:
            if warning not in self._shown:
                self._shown.add(warning)
                self.notice(warning)

    # ------------------------------------------------------------------ deciding
    def plan(self, flags: NetworkChoice, session: tuple[str, NetworkPlan] | None, loaded: config.Loaded,
             presets: dict | None = None) -> Resolution:
        """The network plan. `session`: a live session's (name, plan), which comes before the
        kernel's and the files' choices."""
        inp = NetworkResolutionInput(
            flags=flags,
            session=session[1].as_choice(f"session '{session[0]}'") if session else None,
            kernel=self.network,
            project=config.network_choice(loaded.project, "project"),
            global_=config.network_choice(loaded.global_, "global"),
        )
        return resolve(inp, self.presets() if presets is None else presets)

    def image_for(self, requested: str | None, loaded: config.Loaded) -> str:
        image = requested or self.image or config.merged(loaded, "image")[0]
        return images.resolve_ref(image or "base")

    def workspace_for(self, requested: str | None, loaded: config.Loaded) -> str:
        if requested:
            return requested
        if self.workspace:
            return self.workspace
        mode = config.merged(loaded, "workspace")[0]
        if mode:
            return mode
        return "ro" if config.merged(loaded, "workdir_readonly", False)[0] else "overlay"

    def resources_for(self, memory: str | None, cpus: str | None, disk: str | None,
                      loaded: config.Loaded) -> policy.Resources:
        """Limits of a new session: the cell's flags, else the files, else this machine's size.
        A disk limit above half the free space where disks live is lowered, and said so."""
        free = host.disk_free(self.state)
        default = host.default_resources(free)

        def pick(flag: str | None, key: str) -> str | None:
            return flag if flag is not None else config.merged(loaded, key)[0]

        memory, cpus, disk = pick(memory, "memory"), pick(cpus, "cpus"), pick(disk, "disk")
        resources = policy.Resources(
            memory=config.parse_size(memory, "memory") if memory else default.memory,
            cpus=config.parse_cpus(cpus) if cpus else default.cpus,
            disk=config.parse_size(disk, "disk") if disk else default.disk,
            pids=config.merged(loaded, "pids_limit", policy.PIDS_LIMIT)[0])
        if resources.disk > free // 2:
            capped = max(64 * policy.MIB, free // 2 // policy.MIB * policy.MIB)
            self.notice(f"mino: a disk limit of {size_text(resources.disk)} is more than half the free space "
                        f"where sessions live ({size_text(free)} free in {self.state}); this session gets "
                        f"{size_text(capped)}")
            resources = policy.Resources(resources.memory, resources.cpus, capped, resources.pids)
        return resources

    def home(self) -> str | None:
        home = (self.env or os.environ).get("HOME")
        return str(Path(home).resolve()) if home else None

    # ------------------------------------------------------------------ saving
    def remember_network(self, mode: str, preset: str | None, scope: str, allow: tuple[str, ...] = ()) -> str:
        """Save a network choice for this kernel, the project or every project; returns where."""
        if scope not in SCOPES:
            raise UsageError(f'unknown scope "{scope}"', f"valid scopes: {', '.join(SCOPES)}")
        choice = NetworkChoice("this kernel", mode, preset, tuple(allow) or None)
        plan = resolve(NetworkResolutionInput(flags=choice), self.presets()).plan  # validate first
        self.first_run_done = True
        if scope == "session":
            self.network = choice
            return f"mino: network {plan.describe()} saved for this kernel's sessions"
        local = scope == "project"
        values = {"network": mode, "network_preset": preset, "network_allow": ",".join(allow) if allow else None}
        path = None
        for key, value in values.items():
            if value is None:
                path, _ = config.unset_key(key, local=local, cwd=self.cwd(), env=self.env)
            else:
                path, _ = config.set_key(key, value, local=local, cwd=self.cwd(), env=self.env,
                                         presets=self.presets())
        return f"mino: network {plan.describe()} saved in {path}"

    def trust_project(self, path: Path | None = None) -> str:
        """Trust a project file's current content at its place (the user reviewed it)."""
        path, message = config.trust_project(path, self.cwd(), self.env)
        self._shown = {w for w in self._shown if str(path) not in w}
        return message
