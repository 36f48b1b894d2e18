"""Each mutant breaks one security promise of mino_jupyter/ and names the tests that must catch it.

A mutant is one or more exact text replacements in one file; each `old` must occur exactly once
(a mutant that no longer applies fails the run: keep them in step with the code). The runner
(`tests/mutants/run.py`, `make mutants`, part of `make test`) applies each to a scratch copy,
runs only its tests, and fails when a mutant survives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # for its tests' run (e.g. the one-exec-per-cell path)


EXEC_PATH = (("MINO_EXECUTOR", "0"),)  # the mutant is in the exec-per-cell path: test that path


INT = "tests/integration/"
MAGIC, NET, CONT, ISO = INT + "test_magic.py::", INT + "test_network.py::", INT + "test_containment.py::", INT + "test_isolation.py::"
REMOTE = INT + "test_remote.py::"

MUTANTS = (
    # ---------------------------------------------------------------- the first audit's twelve
    Mutant("caps-kept", "no capability in any set", "mino_jupyter/policy.py",
           (('"cap_drop": ["ALL"],', '"cap_drop": [],'),),
           (MAGIC + "test_hardening_seen_from_the_cell",)),
    Mutant("net-admin-in-session", "the cell holds no NET_ADMIN", "mino_jupyter/policy.py",
           (('        "cap_add": [],\n        "no_new_privileges": True,',
             '        "cap_add": ["NET_ADMIN"],\n        "no_new_privileges": True,'),),
           (NET + "test_capabilities_are_zero_in_allowlist_mode_and_the_firewall_is_invisible",
            MAGIC + "test_hardening_seen_from_the_cell")),
    Mutant("reject-becomes-drop", "a refused connection fails at once", "mino_jupyter/firewall.py",
           (('''    _rule('meta l4proto tcp counter name "refused_tcp" reject with tcp reset',
          _match(_meta("l4proto"), "tcp"), {"counter": "refused_tcp"}, {"reject": {"type": "tcp reset"}}),''',
             '''    _rule('meta l4proto tcp counter name "refused_tcp" drop',
          _match(_meta("l4proto"), "tcp"), {"counter": "refused_tcp"}, {"drop": None}),'''),),
           (NET + "test_allowed_port_answers_and_other_port_is_refused_fast",)),
    Mutant("no-loopback-resolver", "no DNS query leaves an allowlisted session", "mino_jupyter/policy.py",
           (('        spec["dns_server"] = ["127.0.0.1"]\n        spec["dns_search"] = ["."]\n', '        pass\n'),),
           (NET + "test_names_resolve_only_to_mino_answers",)),
    Mutant("udp-53-allowed", "no datagram to port 53 leaves an allowlisted session", "mino_jupyter/firewall.py",
           (('''        return (Chain("output", "output", "drop", OUT_COMMON + OUT_ALLOWED + (''',
             '''        return (Chain("output", "output", "drop", OUT_COMMON + (_rule("udp dport 53 accept",
                    _match(_field("udp", "dport"), 53), ACCEPT),) + OUT_ALLOWED + ('''),),
           (NET + "test_udp_to_port_53_never_arrives",)),
    Mutant("redaction-not-across-chunks", "a secret split across reads is still masked", "mino_jupyter/redact.py",
           (('                    hold = n\n', '                    hold = 0\n'),),
           (MAGIC + "test_logs_outlive_the_container_and_mask_secrets", "tests/unit/test_redact.py")),
    Mutant("raw-log-writes", "the log never holds a secret", "mino_jupyter/logs.py",
           (('        text = self.redactors[stream].feed(text)\n        if text:\n            self._out(stream, text)',
             '        self.log.write(text)\n        text = self.redactors[stream].feed(text)\n'
             '        if text:\n            self._out(stream, text)'),),
           (MAGIC + "test_logs_outlive_the_container_and_mask_secrets",)),
    Mutant("no-watchdog", "containers of a killed kernel are removed", "mino_jupyter/cleanup.py",
           (('        if not self.want_watchdog or (self._watchdog and self._watchdog.poll() is None):',
             '        if True or not self.want_watchdog or (self._watchdog and self._watchdog.poll() is None):'),),
           (MAGIC + "test_sigkilled_kernel_is_cleaned_up_by_the_watchdog",)),
    Mutant("no-load-time-reap", "a kernel that loads reaps what dead kernels left", "mino_jupyter/cleanup.py",
           (('        threading.Thread(target=reap, name="mino-reaper", daemon=True).start()', '        pass'),
            # the first connection reaps too (a prestart connects at load): both go
            ("        if not self.reaped:\n            threading.Thread(target=self.reap,",
             "        if False:\n            threading.Thread(target=self.reap,")),
           (MAGIC + "test_orphans_are_reaped_when_a_kernel_loads",)),
    Mutant("firewall-errors-swallowed", "nothing runs on an open network", "mino_jupyter/launch.py",
           (('        except BaseException as exc:  # an interrupt too: no container is left without its rules',
             '        except ZeroDivisionError as exc:'),),
           (NET + "test_firewall_failure_runs_nothing",)),
    # ---------------------------------------------------------------- containment
    Mutant("exec-as-root", "no process mino starts in a session runs as uid 0", "mino_jupyter/policy.py",
           (('    return exec_body(argv, env={**env, "BASH_ENV": ""})', '    return exec_body(argv, env={**env, "BASH_ENV": ""}, user="0:0")'),),
           (MAGIC + "test_hardening_seen_from_the_cell",), EXEC_PATH),
    Mutant("executor-as-root", "no process mino starts in a session runs as uid 0 (the executor either)",
           "mino_jupyter/policy.py",
           (('    body = exec_body([EXECUTOR], env={}, workdir="/")', '    body = exec_body([EXECUTOR], env={}, workdir="/", user="0:0")'),),
           (MAGIC + "test_hardening_seen_from_the_cell",)),
    Mutant("bash-by-name", "every exec names its program by absolute path", "mino_jupyter/policy.py",
           (('BASH = "/bin/bash"', 'BASH = "bash"'),),
           (CONT + "test_planted_helpers_never_run_for_mino",), EXEC_PATH),
    Mutant("workspace-bind-mounted", "what a cell writes waits for %mino apply", "mino_jupyter/storage.py",
           (('        workspace = str(p.workspace) if self.mode == "overlay" else str(self.notebook_dir)',
             '        workspace = str(self.notebook_dir)'),
            ('        return policy.StorageMounts(workspace=workspace, workspace_mode=self.mode,',
             '        return policy.StorageMounts(workspace=workspace, workspace_mode="rw",')),
           (CONT + "test_nothing_a_cell_writes_runs_on_this_machine",)),
    Mutant("apply-follows-links", "apply never writes or follows a link", "mino_jupyter/changes.py",
           (('    if change.kind != "file":\n        return f"{NOUNS[change.kind]} is never applied"\n', ''),
            ('_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK', '_FILE = os.O_RDONLY | os.O_NONBLOCK'),
            ('    st = _lstat(dir_fd, name)\n    if st is None or not stat.S_ISREG(st.st_mode):\n        return None\n',
             '    st = _lstat(dir_fd, name)\n    if st is None:\n        return None\n'),
            ('    st = os.fstat(fd)\n    if not stat.S_ISREG(st.st_mode):', '    st = os.fstat(fd)\n    if False:')),
           ("tests/unit/test_changes.py", CONT + "test_apply_takes_data_and_refuses_what_could_run")),
    Mutant("trust-by-content-only", "trust is bound to the file's real path and content", "mino_jupyter/config.py",
           (('    return not os.path.islink(path) and _read_trust(env).get(_trust_key(path)) == content_hash(text)',
             '    return content_hash(text) in _read_trust(env).values()'),),
           ("tests/unit/test_config.py",)),
    Mutant("untrusted-hides-trusted", "an untrusted project file hides nothing above it", "mino_jupyter/config.py",
           (('        fc, _, _ = parse_text(pf.path, pf.text)\n        if fc is None or fc.values:',
             '        break\n        fc, _, _ = parse_text(pf.path, pf.text)\n        if fc is None or fc.values:'),),
           ("tests/unit/test_config.py",)),
    Mutant("bridge-reaches-this-machine", "bridge reaches no service on this machine", "mino_jupyter/firewall.py",
           (('OUT_COMMON + OUT_DNS + OUT_ALLOWED + OUT_LOCAL', 'OUT_COMMON + OUT_DNS + OUT_ALLOWED'),),
           (ISO + "test_bridge_reaches_the_internet_but_no_service_on_this_machine",)),
    Mutant("inbound-accepted", "nothing comes in", "mino_jupyter/firewall.py",
           (('Chain("input", "input", "drop", IN_COMMON + IN_REPLIES + IN_END)',
             'Chain("input", "input", "accept", IN_COMMON + IN_REPLIES)'),),
           (ISO + "test_nothing_comes_in_from_other_containers",)),
    Mutant("narrowing-keeps-flows", "removing an entry cuts flows already open", "mino_jupyter/firewall.py",
           (('''        return (Chain("output", "output", "drop", OUT_COMMON + OUT_ALLOWED + (''',
             '''        return (Chain("output", "output", "drop", OUT_COMMON + IN_REPLIES + OUT_ALLOWED + ('''),
            ('''                Chain("input", "input", "drop", IN_COMMON + IN_ALLOWED + IN_END))''',
             '''                Chain("input", "input", "drop", IN_COMMON + IN_REPLIES + IN_ALLOWED + IN_END))''')),
           (ISO + "test_removing_an_entry_cuts_a_flow_that_is_already_open",)),
    Mutant("no-memory-limit", "memory is limited", "mino_jupyter/policy.py",
           (('        "memory": {"limit": resources.memory, "swap": resources.memory},\n', ''),),
           (CONT + "test_memory_limit_holds_and_names_itself",)),
    Mutant("writable-root", "everything a cell writes is on its size-limited disk", "mino_jupyter/policy.py",
           (('        "read_only_filesystem": True,', '        "read_only_filesystem": False,'),),
           (CONT + "test_disk_limit_holds_for_everything_the_cell_writes",)),
    Mutant("no-seccomp", "no user namespaces", "mino_jupyter/host.py",
           (('    for candidate in seccomp.DEFAULT_PROFILE_PATHS:', '    for candidate in ():'),),
           (CONT + "test_no_user_namespaces_in_any_mode",)),
    Mutant("init-as-cell-user", "a cell cannot stop its container", "mino_jupyter/policy.py",
           (('INIT_USER = f"{INIT_UID}:{INIT_UID}"', 'INIT_USER = f"{CELL_UID}:{CELL_UID}"'),),
           (CONT + "test_a_cell_cannot_stop_its_container_and_a_stopped_one_is_replaced",)),
    Mutant("secrets-per-cell", "a secret is masked in every later output of its session", "mino_jupyter/sessions.py",
           (('        session.secrets |= values  #', '        session.secrets = set(values)  #'),),
           (CONT + "test_a_secret_is_masked_in_every_later_output_of_its_session",)),
    # ---------------------------------------------------------------- rootless
    Mutant("rootless-no-process-limit", "the 4096-process limit holds where the engine ignores cgroup limits",
           "mino_jupyter/policy.py",
           (('    nproc_ceiling = resources.pids if (runs_cells and not engine.cgroup_limits) else NPROC_CEILING',
             '    nproc_ceiling = NPROC_CEILING'),),
           ("tests/unit/test_policy.py", "tests/unit/test_owner_doctor_image.py")),
    Mutant("rootless-gaps-unsaid", "a limit the engine cannot apply is said, never silently dropped",
           "mino_jupyter/policy.py",
           (('    return [w for w in warnings if not (CGROUP_LIMITS_IGNORED in w and not engine.cgroup_limits)]',
             '    return []'),
            ('    return tuple(gaps)\n', '    return ()\n')),
           ("tests/unit/test_policy.py",)),
    Mutant("rootless-opaque-mark-mixed", "each overlay's changes are read with its own opaque mark",
           "mino_jupyter/mounts.py",
           (('    opaque_xattr = "user.overlay.opaque"', '    opaque_xattr = "trusted.overlay.opaque"'),),
           ("tests/unit/test_changes.py",)),
    Mutant("stop-by-group-only", "a timeout stops everything the cell started", "mino_jupyter/procs.py",
           (('    return Stopped(used, freezer.sweep(ns, started, proc, uid, boundary, shell) if freezer else\n'
             '                   sweep(ns, started, proc, uid, boundary, shell))',
             '    return Stopped(used, ())'),),
           (CONT + "test_timeout_and_interrupt_stop_everything_the_cell_started",)),
    # ---------------------------------------------------------------- the resident executor
    Mutant("executor-readable", "the executor is closed to the cell from its first instruction (mode 0111)",
           "mino_jupyter/executor.py",
           (("        os.chmod(tmp, 0o111)", "        os.chmod(tmp, 0o755)"),
            ("and stat.S_ISREG(f.st_mode) and f.st_uid == me and stat.S_IMODE(f.st_mode) == 0o111",
             "and stat.S_ISREG(f.st_mode) and f.st_uid == me and stat.S_IMODE(f.st_mode) == 0o755")),
           (INT + "test_executor.py::test_the_executor_is_closed_to_a_cell_of_the_same_uid",)),
    Mutant("executor-cells-not-the-cells", "an interrupt stops the cell's group when the executor started it",
           "mino_jupyter/procs.py",
           (("            if p.uid != uid or p.pid == boundary:", "            if p.uid != uid:"),),
           (MAGIC + "test_interrupt_stops_the_whole_process_group",)),
    # ---------------------------------------------------------------- rules from this machine
    Mutant("host-rules-any-namespace", "this machine's nft enters only the session container's own namespace",
           "mino_jupyter/session_firewall.py",
           (("    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):", "    if False:"),),
           (NET + "test_bridge_rules_come_from_this_machine_on_a_local_rootful_engine",)),
    Mutant("host-rules-unverified", "rules set from this machine are checked like the firewall container's",
           "mino_jupyter/session_firewall.py",
           (('            return listing + b"@@mino-end %d\\n" % (0 if code == 0 else 1), err',
             '            return b"@@mino-end 0\\n", err'),),
           (NET + "test_bridge_rules_come_from_this_machine_on_a_local_rootful_engine",)),
    # ---------------------------------------------------------------- engines elsewhere
    Mutant("elsewhere-taken-for-here", "only an engine whose processes are this machine's gets its files bound",
           "mino_jupyter/runtime.py",
           (('                    here = exe.startswith("podman") and (', '                    here = True or ('),),
           ("tests/unit/test_owner_doctor_image.py", REMOTE + "test_an_engine_over_tcp_gets_a_copy_even_where_it_"
            "shares_this_machine_s_files")),
    Mutant("elsewhere-pid-signalled-here", "a pid an engine elsewhere reports is never signalled here",
           "mino_jupyter/cell.py",
           (("        if not namespace:  # the engine's processes are not this machine's: its pids name others here",
             "        if False:"),),
           ("tests/unit/test_elsewhere.py",)),
    Mutant("snapshot-follows-links", "reading a workspace back never writes through a link the cell planted",
           "mino_jupyter/copied.py",
           (('_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC',
             '_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC'),),
           ("tests/unit/test_copied.py",)),
    Mutant("copy-owned-by-init", "a copied workspace is the cell's, as the notebook's directory is under an overlay",
           "mino_jupyter/copied.py",
           (("            engine.put_archive(loader, policy.WORKDIR, data)",
             "            engine.put_archive(container, policy.WORKDIR, data)"),),
           (REMOTE + "test_an_engine_that_does_not_see_this_machine_s_files_gets_a_copy_and_changes_come_back",)),
    Mutant("limits-not-asked", "an engine elsewhere with lower limits than this machine still starts sessions",
           "mino_jupyter/launch.py",
           (("        copied.probe_limits(engine, image=req.image, labels=k.owner)", "        pass"),),
           (REMOTE + "test_an_engine_elsewhere_with_lower_limits_gets_what_it_allows",)),
    Mutant("lease-never-ends", "containers on an engine elsewhere end themselves when the kernel is lost",
           "mino_jupyter/policy.py",
           (("  (( SECONDS - renewed < lease )) || exit 0", "  (( SECONDS - renewed < lease )) || :"),),
           (REMOTE + "test_containers_on_an_engine_elsewhere_end_themselves_when_the_kernel_is_lost",)),
)
