#!/usr/bin/env bash
# Host set-up for mino-jupyter, idempotent: run it as often as you like.
#   1. system packages (Debian/Ubuntu, as root): podman, runc, iptables, nftables, libcap2-bin, ...
#   2. Podman configuration this host needs (OCI runtime on hybrid cgroups, exec clean-up; for a
#      normal user also subordinate IDs, the runtime directory and overlay storage)
#   3. the Podman API service, started when its socket does not answer
#   4. the project's virtualenv (.venv) with the package and its test extras
#   5. the base image localhost/mino-base:<version> when missing: FROM a registry image when one
#      answers, else offline from Debian packages (and with
#      --toolchains the python and node images on top of it)
# With everything in place it changes nothing and takes a few seconds.
#
# As root it sets up rootful Podman (/run/podman/podman.sock). As a normal user it sets up
# rootless Podman for that user ($XDG_RUNTIME_DIR/podman/podman.sock, the user's own images);
# what needs root there (missing packages, subordinate IDs, /run/user/UID) is one command:
#   sudo scripts/setup-host.sh --rootless-user NAME
# which does only that root step for NAME (creating the user when missing) and stops.
#
# Usage: scripts/setup-host.sh [--no-image] [--browser] [--toolchains] [--rootless-user NAME]
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/scripts/setup-host.sh
VENV=${MINO_VENV:-$ROOT/.venv}
SOCKET=/run/podman/podman.sock
WANT_IMAGE=1
WANT_BROWSER=0
WANT_TOOLCHAINS=0
WANT_SSH=0
ROOTLESS_USER=
while [ $# -gt 0 ]; do
    case $1 in
        --no-image) WANT_IMAGE=0 ;;
        --browser) WANT_BROWSER=1 ;;
        --toolchains) WANT_TOOLCHAINS=1 ;;
        --ssh) WANT_SSH=1 ;;
        --rootless-user) [ $# -ge 2 ] || { echo "setup-host: --rootless-user needs a user name" >&2; exit 2; }
                         ROOTLESS_USER=$2; shift ;;
        --rootless-user=*) ROOTLESS_USER=${1#*=} ;;
        *) echo "setup-host: unknown option $1 (valid: --no-image, --browser, --toolchains, --ssh, --rootless-user NAME)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: warning: %s\n' "$1" >&2; shift; for line in "$@"; do printf '  %s\n' "$line" >&2; done; }
die() { printf 'setup: error: %s\n' "$1" >&2; [ -n "${2:-}" ] && printf '  hint: %s\n' "$2" >&2; exit 1; }

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
if [ -n "$ROOTLESS_USER" ]; then
    [ "$IS_ROOT" = 1 ] || die "--rootless-user is the root step for a rootless user; run it as root" \
                              "sudo $SELF --rootless-user $ROOTLESS_USER"
    [ "$ROOTLESS_USER" != root ] || die "--rootless-user root makes no sense" "name a normal user"
fi

# ---------------------------------------------------------------- 1. packages
PACKAGES=(podman catatonit netavark aardvark-dns runc iptables nftables libcap2-bin debootstrap iproute2 curl ca-certificates
          uidmap slirp4netns mmdebstrap tar make python3 python3-venv e2fsprogs mount gcc libc6-dev)
[ "$WANT_BROWSER" = 1 ] && PACKAGES+=(chromium chromium-driver)
# The ssh engine tests run their own sshd on loopback (never the system's service).
[ "$WANT_SSH" = 1 ] && PACKAGES+=(openssh-client openssh-server)

missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # python3-venv is not needed when the python3 on PATH already makes venvs (pyenv, etc.)
    if [[ " ${missing[*]} " == *" python3-venv "* ]] && python3 -c 'import venv, ensurepip' 2>/dev/null; then
        missing=("${missing[@]/python3-venv}")
    fi
    if [[ " ${missing[*]} " == *" python3 "* ]] && command -v python3 >/dev/null; then
        missing=("${missing[@]/python3}")
    fi
    read -r -a missing <<<"${missing[*]:-}"
else
    for c in podman iptables capsh debootstrap python3; do command -v "$c" >/dev/null || missing+=("$c"); done
    [ "$IS_ROOT" = 1 ] || for c in newuidmap slirp4netns mmdebstrap; do command -v "$c" >/dev/null || missing+=("$c"); done
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$IS_ROOT" != 1 ]; then
        if command -v apt-get >/dev/null; then
            die "missing: ${missing[*]}; installing them needs root" \
                "run 'sudo $SELF --rootless-user $(id -un)' (installs them and prepares rootless Podman for you; then rerun this)"
        fi
        die "missing: ${missing[*]}; installing them needs root" \
            "install them with your package manager (Fedora: dnf install podman iptables-nft libcap debootstrap shadow-utils slirp4netns mmdebstrap)"
    fi
    if ! command -v apt-get >/dev/null; then
        die "missing: ${missing[*]} and this is not Debian/Ubuntu (no apt-get)" \
            "install podman, runc, iptables, nftables, libcap (capsh), debootstrap and python3 with your package manager"
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # openssh-server is for the tests' own sshd on loopback: its package must not start (or
    # enable) a system-wide one listening on port 22. Only when it was not there at all (an sshd
    # the machine already has, held or half-configured, is left exactly as it is).
    new_sshd=0
    if [[ " ${missing[*]} " == *" openssh-server "* ]] \
            && [ "$(dpkg-query -W -f='${db:Status-Status}' openssh-server 2>/dev/null)" != installed ] \
            && ! { command -v systemctl >/dev/null && systemctl is-enabled ssh.service >/dev/null 2>&1; }; then
        new_sshd=1
    fi
    ours_rc=0
    if [ "$new_sshd" = 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && ours_rc=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when the install fails: services start again
    fi
    apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ "$ours_rc" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    if [ "$new_sshd" = 1 ] && command -v systemctl >/dev/null; then
        systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
    if grep -qi ubuntu /etc/os-release 2>/dev/null; then
        apt-get install -y -qq debian-archive-keyring >/dev/null   # debootstrap of Debian bookworm
    fi
else
    say "system packages present"
fi

# Subordinate IDs: rootless Podman maps a container's users onto the user's range in
# /etc/subuid and /etc/subgid (a line NAME:START:COUNT, or UID:START:COUNT).
SUBIDS_NEEDED=65536
subid_count() {  # subid_count FILE NAME UID: how many IDs FILE grants NAME
    [ -r "$1" ] || { echo 0; return; }
    awk -F: -v n="$2" -v u="$3" 'NF == 3 && ($1 == n || $1 == u) && $3 ~ /^[0-9]+$/ { s += $3 } END { print s + 0 }' "$1"
}
free_subid_start() {  # the first ID above every range already granted: ranges never overlap
    cat /etc/subuid /etc/subgid 2>/dev/null \
        | awk -F: 'NF == 3 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ && $2 + $3 > m { m = $2 + $3 } END { print (m > 100000 ? m : 100000) }'
}
owned_private_dir() {  # owned_private_dir DIR UID: a runtime directory (Podman's test, and mino's)
    [ -d "$1" ] && [ "$(stat -c %u "$1")" = "$2" ] && (( (8#$(stat -c %a "$1") & 8#022) == 0 ))
}
CGROUP_HYBRID=0
# crun refuses cgroup v1 hosts whose cgroup2 hierarchy holds controllers ("hybrid mode");
# runc handles them. Decide from the host, not from a guess.
if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] && [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
    CGROUP_HYBRID=1
fi

# ---------------------------------------------------------------- root step for a rootless user
if [ -n "$ROOTLESS_USER" ]; then
    name=$ROOTLESS_USER
    did=()
    if ! id -u "$name" >/dev/null 2>&1; then
        useradd -m -s /bin/bash "$name"   # on Debian this also grants subordinate ID ranges
        did+=("created user $name")
    fi
    uid=$(id -u "$name")
    group=$(id -gn "$name")
    home=$(getent passwd "$name" | cut -d: -f6)
    subids_added=0
    start=$(free_subid_start)   # one start for both kinds: the same numbers in both files
    for kind in uid gid; do
        have=$(subid_count "/etc/sub$kind" "$name" "$uid")
        if [ "$have" -lt "$SUBIDS_NEEDED" ]; then
            usermod "--add-sub${kind}s" "$start-$((start + SUBIDS_NEEDED - 1))" "$name"
            did+=("gave $name the subordinate ${kind}s $start-$((start + SUBIDS_NEEDED - 1)) in /etc/sub$kind")
            subids_added=1
        fi
    done
    # The user's python3 is the system one (another user's pyenv under /root is not theirs to run).
    if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
        command -v apt-get >/dev/null || die "/usr/bin/python3 cannot make virtualenvs" "install your distribution's python3 venv package"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        did+=("installed python3-venv (the system python3 could not make virtualenvs)")
    fi
    # Podman's runtime directory for the user when no login session made one (su, runuser, CI).
    # /run is a tmpfs: after a reboot this is needed again.
    rundir=/run/user/$uid
    if [ ! -d "$rundir" ]; then
        install -d -m 700 -o "$name" -g "$group" "$rundir"
        did+=("created $rundir (0700, $name)")
    elif ! owned_private_dir "$rundir" "$uid" || [ "$(stat -c %a "$rundir")" != 700 ]; then
        chown "$name:$group" "$rundir"
        chmod 700 "$rundir"
        did+=("made $rundir $name's own, mode 0700")
    fi
    if [ "$subids_added" = 1 ] && [ -d "$home/.local/share/containers" ]; then
        # Podman keeps the old mapping in its pause process and storage until migrated.
        runuser -u "$name" -- env -i HOME="$home" USER="$name" LOGNAME="$name" PATH=/usr/local/bin:/usr/bin:/bin \
            XDG_RUNTIME_DIR="$rundir" podman system migrate >/dev/null 2>&1 || true
        did+=("ran 'podman system migrate' as $name for the new ranges")
    fi
    if [ "${#did[@]}" -eq 0 ]; then
        say "rootless user $name ready (uid $uid, subordinate IDs, $rundir): nothing to change"
    else
        for line in "${did[@]}"; do say "$line"; done
        say "rootless user $name ready (uid $uid)"
    fi
    say "next, as $name: XDG_RUNTIME_DIR=$rundir $SELF"
    exit 0
fi

# ---------------------------------------------------------------- 2. podman configuration
CONFIG_CHANGED=0
write_dropin() {  # write_dropin FILE CONTENT: only when it differs, so re-runs change nothing
    if [ "$(cat "$1" 2>/dev/null)" != "$2" ]; then
        mkdir -p "$(dirname "$1")"
        printf '%s\n' "$2" >"$1"
        CONFIG_CHANGED=1
        say "wrote $1"
    fi
}
if [ "$IS_ROOT" = 1 ]; then
    DROPINS=/etc/containers/containers.conf.d
else
    ME=$(id -un)
    MYUID=$(id -u)
    # Subordinate IDs: without them every image with more than one user fails to load.
    for kind in uid gid; do
        if [ "$(subid_count "/etc/sub$kind" "$ME" "$MYUID")" -lt "$SUBIDS_NEEDED" ]; then
            start=$(free_subid_start)
            die "$ME has no subordinate ${kind} range of $SUBIDS_NEEDED IDs in /etc/sub$kind: rootless Podman cannot map a container's users" \
                "sudo usermod --add-subuids $start-$((start + SUBIDS_NEEDED - 1)) --add-subgids $start-$((start + SUBIDS_NEEDED - 1)) $ME, then 'podman system migrate' (or: sudo $SELF --rootless-user $ME)"
        fi
    done
    # The runtime directory, by Podman's own rule (and mino's, mino_jupyter/runtime.py): $XDG_RUNTIME_DIR
    # when set; else /run/user/UID when it is ours and no one else may write it; else
    # ${TMPDIR:-/tmp}/podman-run-UID. Exported, so every Podman below agrees on it.
    if [ -n "${XDG_RUNTIME_DIR:-}" ]; then
        if ! owned_private_dir "$XDG_RUNTIME_DIR" "$MYUID"; then
            die "XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR is missing, not owned by $ME or writable by others: Podman keeps its state and socket there" \
                "unset XDG_RUNTIME_DIR, or: sudo install -d -m 700 -o $ME /run/user/$MYUID; export XDG_RUNTIME_DIR=/run/user/$MYUID (on systemd hosts: loginctl enable-linger $ME)"
        fi
        RUNTIME_DIR=$XDG_RUNTIME_DIR
    elif owned_private_dir "/run/user/$MYUID" "$MYUID"; then
        RUNTIME_DIR=/run/user/$MYUID
    else
        RUNTIME_DIR=${TMPDIR:-/tmp}/podman-run-$MYUID
        mkdir -p -m 700 "$RUNTIME_DIR"
        owned_private_dir "$RUNTIME_DIR" "$MYUID" \
            || die "$RUNTIME_DIR is not $ME's own private directory, and there is no /run/user/$MYUID" \
                   "sudo install -d -m 700 -o $ME /run/user/$MYUID; export XDG_RUNTIME_DIR=/run/user/$MYUID"
        say "no XDG_RUNTIME_DIR and no usable /run/user/$MYUID: Podman's runtime directory is $RUNTIME_DIR"
    fi
    export XDG_RUNTIME_DIR=$RUNTIME_DIR
    SOCKET=$RUNTIME_DIR/podman/podman.sock
    CONF_HOME=${XDG_CONFIG_HOME:-$HOME/.config}/containers
    DROPINS=$CONF_HOME/containers.conf.d   # read after /etc/containers by rootless Podman
fi
if [ "$CGROUP_HYBRID" = 1 ]; then
    write_dropin "$DROPINS/50-mino-runtime.conf" '# written by mino-jupyter scripts/setup-host.sh: crun fails on hybrid cgroups here
[engine]
runtime = "runc"'
fi
# Through the REST API every finished exec keeps its session record and a conmon process
# for exit_command_delay seconds (300 by default, "like Docker"). mino reads the exit code
# within milliseconds of the end of the stream, so a short delay is enough and a notebook
# with thousands of cells does not pile up thousands of processes.
write_dropin "$DROPINS/51-mino-exec-cleanup.conf" '# written by mino-jupyter scripts/setup-host.sh: clean up finished exec sessions soon
[engine]
exit_command_delay = 10'

ping_socket() { curl -fsS --max-time 3 --unix-socket "$1" http://d/_ping >/dev/null 2>&1; }
stop_service() {  # the API service this script (or mino) started on $SOCKET; containers keep running
    ping_socket "$SOCKET" || return 0
    pkill -u "$(id -u)" -f "podman system service --time=0 unix://$SOCKET" || true
    for _ in $(seq 1 50); do ping_socket "$SOCKET" || break; sleep 0.1; done
}

if [ "$IS_ROOT" != 1 ]; then
    # Storage: without a storage.conf rootless Podman may pick vfs, a full copy of the image per
    # container (5-6 s per start). Overlay is native for unprivileged users on Linux >= 5.13.
    STORAGE_CONF=$CONF_HOME/storage.conf
    info_err=$(mktemp)
    if ! driver=$(podman info --format '{{.Store.GraphDriverName}}' 2>"$info_err"); then
        # The user's pause process (it holds the user namespace) is gone but its pid file is
        # not: after a reboot without a fresh /run, or when something killed it. Its containers
        # died with it; Podman's own remedy rebuilds the state and changes no image or volume.
        if grep -q 'podman system migrate' "$info_err"; then
            say "$ME's Podman pause process is gone (stale state in $XDG_RUNTIME_DIR): running 'podman system migrate'"
            podman system migrate >/dev/null 2>"$info_err" || true
            driver=$(podman info --format '{{.Store.GraphDriverName}}' 2>"$info_err") || driver=
        fi
        if [ -z "$driver" ]; then
            cat "$info_err" >&2
            rm -f "$info_err"
            die "'podman info' fails for $ME (its message is above)" \
                "check the subordinate IDs (/etc/subuid, /etc/subgid) and $XDG_RUNTIME_DIR"
        fi
    fi
    rm -f "$info_err"
    storage_is_empty() {  # nothing a reset would destroy: containers, images, volumes, pods, networks
        local out
        out=$(podman ps -aq --external) && [ -z "$out" ] || return 1
        out=$(podman images -aq) && [ -z "$out" ] || return 1
        out=$(podman volume ls -q) && [ -z "$out" ] || return 1
        out=$(podman pod ps -q) && [ -z "$out" ] || return 1
        out=$(podman network ls -q) && [ -z "$(grep -vx podman <<<"$out")" ] || return 1
    }
    if [ "$driver" = vfs ] && [ ! -e "$STORAGE_CONF" ]; then
        if storage_is_empty; then
            say "switching $ME's empty Podman storage from vfs to overlay (starts in 0.2-0.6 s instead of 5-6 s)"
            stop_service
            podman system reset -f >/dev/null
            mkdir -p "$CONF_HOME"
            printf '%s\n' '# written by mino-jupyter scripts/setup-host.sh: vfs copies the image for every container' \
                '[storage]' 'driver = "overlay"' >"$STORAGE_CONF"
            CONFIG_CHANGED=1
            driver=$(podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null) || driver=
            if [ "$driver" != overlay ]; then
                rm -f "$STORAGE_CONF"
                podman system reset -f >/dev/null 2>&1 || true
                warn "overlay storage does not work for $ME here; staying on vfs (5-6 s per container start)"
            else
                say "wrote $STORAGE_CONF (driver = \"overlay\")"
            fi
        else
            warn "$ME's rootless Podman uses the vfs storage driver: every container start copies the image (5-6 s)." \
                 "Overlay starts in 0.2-0.6 s. Switching resets Podman's storage (all of $ME's containers, images and volumes), so this script does not do it:" \
                 "  podman save -o ~/images.tar IMAGE...   # anything you want to keep" \
                 "  printf '[storage]\\ndriver = \"overlay\"\\n' > $STORAGE_CONF" \
                 "  podman system reset -f && podman load -i ~/images.tar && $SELF"
        fi
    elif [ "$driver" = vfs ]; then
        warn "$STORAGE_CONF selects vfs: every container start copies the image (5-6 s); overlay is much faster"
    fi
fi

# ---------------------------------------------------------------- 3. the API service
if [ -n "${CONTAINER_HOST:-}" ]; then
    say "CONTAINER_HOST=$CONTAINER_HOST is set: using it as is"
elif ping_socket "$SOCKET" && [ "$CONFIG_CHANGED" = 0 ]; then
    say "Podman API answers at $SOCKET"
else
    if [ "$CONFIG_CHANGED" = 1 ] && ping_socket "$SOCKET"; then
        # The service reads containers.conf when it starts; containers keep running meanwhile.
        stop_service
        say "restarting the Podman API service for the new configuration"
    fi
    mkdir -p "$(dirname "$SOCKET")"
    rm -f "$SOCKET"
    LOG=${XDG_STATE_HOME:-$HOME/.local/state}/mino/podman-service.log
    mkdir -p "$(dirname "$LOG")"
    (cd / && exec setsid podman system service --time=0 "unix://$SOCKET" </dev/null >>"$LOG" 2>&1) &
    for _ in $(seq 1 100); do ping_socket "$SOCKET" && break; sleep 0.1; done
    ping_socket "$SOCKET" || die "the Podman API service did not come up at $SOCKET" "see $LOG and 'podman info'"
    say "started the Podman API service at $SOCKET (log: $LOG)"
fi

# ---------------------------------------------------------------- 4. the virtualenv
# The first python3 this user can run that makes venvs: PATH decides, then the system one
# (another user's pyenv, e.g. under /root, is on PATH but not runnable).
PYTHON=
for candidate in python3 /usr/bin/python3; do
    if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        PYTHON=$candidate
        break
    fi
done
STAMP=$VENV/.mino-installed
want_stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    [ -n "$PYTHON" ] || die "no python3 (3.10 or newer) that can make virtualenvs" \
                            "install python3 and python3-venv (as root: apt-get install python3-venv)"
    if [ -e "$VENV/bin/python" ]; then
        say "recreating $VENV (its python does not run for $(id -un))"
        "$PYTHON" -m venv --clear "$VENV"
    else
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
    say "installing mino-jupyter and its test dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c 'import mino_jupyter, podman, tomlkit, IPython, ipywidgets' \
        || die "the virtualenv install failed" "rerun with network access to PyPI; see pip's output above"
    echo "$want_stamp" >"$STAMP"
else
    say "virtualenv up to date"
fi

# ---------------------------------------------------------------- 5. the images
if [ "$WANT_IMAGE" = 1 ]; then
    refs=$("$VENV/bin/python" -c 'from mino_jupyter.image import resolve_ref as r; print(r("base"), r("python"), r("node"))')
    read -r base_ref python_ref node_ref <<<"$refs"
    if podman image exists "$base_ref" 2>/dev/null; then
        say "image $base_ref present"
    else
        # FROM debian:bookworm-slim when a registry answers; otherwise (it says so) from Debian
        # packages: debootstrap as root, mmdebstrap in a user namespace as a normal user.
        # MINO_IMAGE_FROM=IMAGE builds on an image of your choice.
        "$VENV/bin/mino-jupyter" image build ${MINO_IMAGE_FROM:+--from "$MINO_IMAGE_FROM"}
    fi
    if [ "$WANT_TOOLCHAINS" = 1 ]; then
        for pair in "python:$python_ref" "node:$node_ref"; do
            if podman image exists "${pair#*:}" 2>/dev/null; then
                say "image ${pair#*:} present"
            else
                "$VENV/bin/mino-jupyter" image build "${pair%%:*}"
            fi
        done
    fi
fi
say "done"
