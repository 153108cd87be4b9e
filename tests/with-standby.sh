#!/usr/bin/env bash
# with-standby.sh CMD ARGS...: run CMD against a throwaway primary and a hot standby streaming
# from it (tools/pgtmp.sh run --standby), removed afterwards.
# Unlike tests/with-server.sh it never uses a server named by PGSCOPE_TEST_CONNINFO: the tests it
# runs promote the standby and stop the primary, which no other test may share. CMD gets
# pgtmp.sh's environment (PGSCOPE_TEST_CONNINFO for the primary, PGSCOPE_STANDBY_CONNINFO, ...),
# and PGSCOPE_PGTMP, the path of pgtmp.sh, for its `promote`, `pgctl` and `pgctl-standby`.
set -euo pipefail

if [[ $# -eq 0 ]]; then
	echo "usage: $0 CMD ARGS..." >&2
	exit 2
fi

# Found from this script's own location, so it works from any cwd (meson runs tests in the
# build dir) and through symlinks.
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
export PGSCOPE_PGTMP=${PGSCOPE_PGTMP:-$repo/tools/pgtmp.sh}
exec "$repo/tools/pgtmp.sh" run --standby -- "$@"
