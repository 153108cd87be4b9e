#!/usr/bin/env bash
# with-server.sh CMD ARGS...: run CMD against a PostgreSQL server.
# meson wraps every test in this script so that a bare `meson test -C build` works: when
# PGSCOPE_TEST_CONNINFO is set (tools/run-tests, or a user's own server) the test uses that
# server; otherwise this starts a throwaway cluster just for CMD and removes it afterwards.
set -euo pipefail

if [[ $# -eq 0 ]]; then
	echo "usage: $0 CMD ARGS..." >&2
	exit 2
fi

if [[ -n ${PGSCOPE_TEST_CONNINFO:-} ]]; then
	exec "$@"
fi

# Found from this script's own location, so it works from any cwd (meson runs tests in the
# build dir) and through symlinks.
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
exec "$repo/tools/pgtmp.sh" run -- "$@"
