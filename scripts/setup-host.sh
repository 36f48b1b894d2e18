#!/usr/bin/env bash
# Host set-up for mino-jupyter, idempotent: run it as often as you like.
#   1. system packages (Debian/Ubuntu, as root): podman, runc, iptables, nftables, libcap2-bin, ...
#   2. Podman configuration this host needs (OCI runtime on hybrid cgroups)
#   3. the Podman API service, started when its socket does not answer
#   4. the project's virtualenv (.venv) with the package and its test extras
#   5. the base image localhost/mino-base:<version> when missing: FROM a registry image when one
#      answers, else offline from Debian packages (and with
#      --toolchains the python and node images on top of it)
# With everything in place it changes nothing and takes a few seconds.
#
# Usage: scripts/setup-host.sh [--no-image] [--browser] [--toolchains]
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MINO_VENV:-$ROOT/.venv}
SOCKET=/run/podman/podman.sock
WANT_IMAGE=1
WANT_BROWSER=0
WANT_TOOLCHAINS=0
for arg in "$@"; do
    case $arg in
        --no-image) WANT_IMAGE=0 ;;
        --browser) WANT_BROWSER=1 ;;
        --toolchains) WANT_TOOLCHAINS=1 ;;
        *) echo "setup-host: unknown option $arg (valid: --no-image, --browser, --toolchains)" >&2; exit 2 ;;
    esac
done

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$1" >&2; [ -n "${2:-}" ] && printf '  hint: %s\n' "$2" >&2; exit 1; }

# ---------------------------------------------------------------- 1. packages
PACKAGES=(podman catatonit netavark aardvark-dns runc iptables nftables libcap2-bin debootstrap iproute2 uidmap curl ca-certificates
          tar make python3 python3-venv e2fsprogs mount)
[ "$WANT_BROWSER" = 1 ] && PACKAGES+=(chromium chromium-driver)

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
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        die "missing: ${missing[*]}; installing them needs root" \
            "run 'sudo $0', or install them yourself (Fedora: dnf install podman iptables-nft libcap debootstrap)"
    fi
    if ! command -v apt-get >/dev/null; then
        die "missing: ${missing[*]} and this is not Debian/Ubuntu (no apt-get)" \
            "install podman, runc, iptables, nftables, libcap (capsh), debootstrap and python3 with your package manager"
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    if grep -qi ubuntu /etc/os-release 2>/dev/null; then
        apt-get install -y -qq debian-archive-keyring >/dev/null   # debootstrap of Debian bookworm
    fi
else
    say "system packages present"
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
if [ "$(id -u)" = 0 ]; then
    DROPINS=/etc/containers/containers.conf.d
    # crun refuses cgroup v1 hosts whose cgroup2 hierarchy holds controllers ("hybrid mode");
    # runc handles them. Decide from the host, not from a guess.
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] && [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]; then
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
fi

# ---------------------------------------------------------------- 3. the API service
ping_socket() { curl -fsS --max-time 3 --unix-socket "$1" http://d/_ping >/dev/null 2>&1; }
if [ "$(id -u)" != 0 ]; then
    SOCKET=${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/podman/podman.sock
fi
if [ -n "${CONTAINER_HOST:-}" ]; then
    say "CONTAINER_HOST=$CONTAINER_HOST is set: using it as is"
elif ping_socket "$SOCKET" && [ "$CONFIG_CHANGED" = 0 ]; then
    say "Podman API answers at $SOCKET"
else
    if [ "$CONFIG_CHANGED" = 1 ] && ping_socket "$SOCKET"; then
        # The service reads containers.conf when it starts; containers keep running meanwhile.
        pkill -f "podman system service --time=0 unix://$SOCKET" || true
        for _ in $(seq 1 50); do ping_socket "$SOCKET" || break; sleep 0.1; done
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
STAMP=$VENV/.mino-installed
want_stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
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
        # packages with debootstrap. MINO_IMAGE_FROM=IMAGE builds on an image of your choice.
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
