#!/usr/bin/env bash
# The integration suite as a normal user with rootless Podman (run as root; `make test` ends
# with it, `make test-rootless` runs it alone).
#   1. the root step for the user (scripts/setup-host.sh --rootless-user): the user, its
#      subordinate IDs, /run/user/UID, packages
#   2. a copy of the current working tree (uncommitted changes included; not .git, .venv,
#      test-artifacts, caches) in ~USER/mino, replacing the previous copy
#   3. as the user, in a clean login-like environment: scripts/setup-host.sh --toolchains
#      (rootless API service, ~USER/.mino-venv, the images in the user's own storage), then
#      MINO_REQUIRE_PODMAN=1 pytest tests/integration $PYTEST_ROOTLESS_ARGS
# The user's venv and images are kept between runs, so a rerun costs the copy and the tests.
#
# Usage: scripts/rootless-test.sh [--setup-only]
# Environment: MINO_ROOTLESS_USER (default mino-ci), PYTEST_ROOTLESS_ARGS (extra pytest args).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
NAME=${MINO_ROOTLESS_USER:-mino-ci}
SETUP_ONLY=0
for arg in "$@"; do
    case $arg in
        --setup-only) SETUP_ONLY=1 ;;
        *) echo "rootless-test: unknown option $arg (valid: --setup-only)" >&2; exit 2 ;;
    esac
done

say() { printf 'rootless-test: %s\n' "$*"; }
die() { printf 'rootless-test: error: %s\n' "$1" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run it as root: it prepares the user $NAME, then runs the tests as $NAME"
started=$SECONDS

# ---------------------------------------------------------------- 1. the root step
scripts/setup-host.sh --rootless-user "$NAME"
UID_=$(id -u "$NAME")
GROUP=$(id -gn "$NAME")
HOME_=$(getent passwd "$NAME" | cut -d: -f6)
DEST=$HOME_/mino
VENV=$HOME_/.mino-venv

# ---------------------------------------------------------------- 2. the working tree
# Unpacked by the user (so the user owns every file) next to the old copy, then swapped in.
# The venv installs the copy in editable mode at the same path, so it stays valid.
NEW=$(runuser -u "$NAME" -- mktemp -d "$HOME_/.mino-copy.XXXXXX")
trap 'rm -rf "$NEW"' EXIT
tar -C "$ROOT" -c -f - \
    --exclude=./.git --exclude=./.venv --exclude=./.bench-venv --exclude=./test-artifacts \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' --exclude=node_modules \
    . | runuser -u "$NAME" -- tar -C "$NEW" -x -f - --no-same-owner
chmod 755 "$NEW"
rm -rf "$DEST"
mv "$NEW" "$DEST"
trap - EXIT
say "copied the working tree of $ROOT to $DEST"

# ---------------------------------------------------------------- 3. as the user
RUN_AS=(runuser -u "$NAME" -- env -i HOME="$HOME_" USER="$NAME" LOGNAME="$NAME" SHELL=/bin/bash
        PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 XDG_RUNTIME_DIR="/run/user/$UID_"
        MINO_VENV="$VENV" PYTEST_ROOTLESS_ARGS="${PYTEST_ROOTLESS_ARGS:-}" SETUP_ONLY="$SETUP_ONLY")
# shellcheck disable=SC2016  # expanded by the user's shell
set +e
"${RUN_AS[@]}" bash -c '
    set -euo pipefail
    cd "$HOME/mino"
    scripts/setup-host.sh --toolchains
    [ "$SETUP_ONLY" = 1 ] && exit 0
    echo "rootless-test: pytest tests/integration as $USER (uid $(id -u)), rootless Podman at $XDG_RUNTIME_DIR/podman/podman.sock"
    MINO_REQUIRE_PODMAN=1 exec "$MINO_VENV/bin/python" -m pytest -p no:cacheprovider tests/integration $PYTEST_ROOTLESS_ARGS
'
rc=$?
set -e
if [ "$rc" = 0 ]; then
    say "passed as $NAME in $((SECONDS - started)) s"
else
    say "FAILED as $NAME (exit $rc) after $((SECONDS - started)) s; the copy is in $DEST, the service log in $HOME_/.local/state/mino/"
fi
exit "$rc"
