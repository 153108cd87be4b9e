#!/usr/bin/env bash
# run-demo-test.sh DEMO: tools/run-demo as a user runs it (with DEMO instead of building build/,
# and so no package check), each run starting its own throwaway server:
#  - bad arguments end the run with the usage and exit 2 before any server is started;
#  - the throwaway server's password never shows on a command line: while the demo runs, its
#    /proc/PID/cmdline (and every other process's) is sampled; the password is read from the
#    demo's environment (pgtmp.sh's PGSCOPE_TEST_CONNINFO);
#  - transfer with a concurrency above the server's max_connections is capped, says so, and
#    holds its invariant.
# Ends with `run-demo: N passed, M failed`.
set -uo pipefail
demo=$(readlink -f "$1")
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
# shellcheck source=tests/expect.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/expect.sh"
tmp=$(mktemp -d)
run_demo_pid=
cleanup() {
	[[ -n $run_demo_pid ]] && kill "$run_demo_pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

# run-demo uses a server named here instead of starting one: none of them, so it starts its own.
# Nor the outer server's conninfo (tools/run-tests sets it): the demo's `--check-args` run, before
# run-demo's server starts, would carry that password, and the sampling below would take that
# short-lived process (and the wrong password) for the demo.
unset PGSCOPE_DEMO_CONNINFO PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGSERVICE
unset PGSCOPE_TEST_CONNINFO PGSCOPE_SOCKET_CONNINFO PGPASSWORD
export PGSCOPE_DEMO_BIN=$demo
# Marks this test's processes, so the sampling below finds our demo and no other.
export PGSCOPE_RUN_DEMO_TEST=$$

# --- arguments are checked before a server starts ---------------------------------------------

for args in "bogus" "commit --count 5" "transfer --count x" "--no-such-option"; do
	# shellcheck disable=SC2086 # word splitting intended
	"$repo/tools/run-demo" $args >"$tmp/out" 2>&1
	rc=$?
	cat "$tmp/out"
	expect "run-demo $args: exit 2" test "$rc" -eq 2
	expect "run-demo $args: the usage" grep -q '^usage: pgscope-demo' "$tmp/out"
	expect "run-demo $args: no server started" bash -c "! grep -q 'pgtmp.sh\|throwaway' '$tmp/out'"
done

# --- the password stays off every command line; the concurrency is capped -----------------------

# read_cmdline PID: its NUL-separated argv into LINE, joined by spaces (no subshell: the sweep
# reads hundreds); fails when PID is gone.
read_cmdline() {
	local args
	{ mapfile -d '' args <"/proc/$1/cmdline"; } 2>/dev/null || return 1
	LINE="${args[*]}"
}

# The cap needs 150 connections: in the sanitizer build (a demo that links libasan) that takes
# minutes, so there only the password check runs (the same code is capped in the plain build).
capped=1
libs=$(ldd "$demo" 2>/dev/null || true) # (no pipe into grep -q: pipefail and SIGPIPE)
if [[ $libs == *libasan* ]]; then
	capped=0
fi
if ((capped)); then
	"$repo/tools/run-demo" transfer --count 300 --concurrency 200 >"$tmp/out" 2>&1 &
else
	"$repo/tools/run-demo" transfer --count 100 --concurrency 8 >"$tmp/out" 2>&1 &
fi
run_demo_pid=$!
demo_pid='' password='' samples=0 leaks=0 sweeps=0
while kill -0 "$run_demo_pid" 2>/dev/null; do
	if [[ -z $demo_pid ]]; then
		for p in /proc/[0-9]*; do
			[[ $p/exe -ef $demo ]] || continue
			env=$({ tr '\0' '\n' <"$p/environ"; } 2>/dev/null) || continue
			grep -qx "PGSCOPE_RUN_DEMO_TEST=$$" <<<"$env" || continue
			# The throwaway server's conninfo, which pgtmp.sh gives the command it runs: not the
			# `--check-args` run before the server starts, the one that connects.
			password=$(sed -n 's/^PGSCOPE_TEST_CONNINFO=.*password=\([^ ]*\).*/\1/p' <<<"$env")
			[[ -n $password ]] || continue
			demo_pid=${p#/proc/}
			break
		done
	fi
	# The demo's command line each time, every other process's now and then.
	if [[ -n $demo_pid ]] && ! [[ -e /proc/$demo_pid ]]; then
		demo_pid='' # gone (a run that ended at once): look again
	fi
	if [[ -n $demo_pid ]] && read_cmdline "$demo_pid"; then
		samples=$((samples + 1))
		[[ $LINE == *"$password"* ]] && leaks=$((leaks + 1))
		if ((samples % 20 == 1)); then
			sweeps=$((sweeps + 1))
			for p in /proc/[0-9]*; do
				read_cmdline "${p#/proc/}" || continue
				if [[ $LINE == *"$password"* ]]; then
					echo "the password is on the command line of ${p#/proc/}" >&2
					leaks=$((leaks + 1))
				fi
			done
		fi
	fi
	sleep 0.02
done
wait "$run_demo_pid"
rc=$?
run_demo_pid=
cat "$tmp/out"
echo "sampled the demo's command line $samples times, every process's $sweeps times"
expect "transfer 300 at 200: exit 0" test "$rc" -eq 0
expect "the server's password was found in the demo's environment" test -n "$password"
expect "the demo's command line was sampled while it ran" test "$samples" -ge 1
expect "every process's command line was sampled while it ran" test "$sweeps" -ge 1
expect "the password was on no command line" test "$leaks" -eq 0
# In this shell: a grep or bash -c would have the password on its own command line.
no_password_in_output() {
	local text
	text=$(<"$tmp/out")
	[[ -n $password && $text != *"$password"* ]]
}
expect "the demo's output has no password" no_password_in_output
if ((capped)); then
	expect "concurrency 200: capped, with a warning" \
		grep -q '^  warning: concurrency 200 capped at [0-9]*, what the server takes now (max_connections 150' "$tmp/out"
	expect "concurrency 200: the pool is smaller than 150" \
		grep -Eq '^== transfer: 300 random serializable transfers, (1[0-4][0-9]|[1-9][0-9]?) at a time' "$tmp/out"
	expect "concurrency 200: every transfer committed or refused" grep -q '\[ok\]   every transfer committed' "$tmp/out"
	expect "concurrency 200: invariant held" grep -q '\[ok\]   invariant held' "$tmp/out"
	expect "concurrency 200: nothing failed" bash -c "! grep -q 'FAIL\|failed with' '$tmp/out'"
fi

echo "run-demo: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
