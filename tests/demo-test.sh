#!/usr/bin/env bash
# demo-test.sh DEMO: runs pgscope-demo's tour and a 2000-transfer run against the test server,
# and asserts on the exit status and on the facts it printed; then that errors are one line.
set -uo pipefail
demo=$1
fails=0
passes=0
expect() { # expect NAME CONDITION...
	local name=$1
	shift
	if "$@"; then
		passes=$((passes + 1))
	else
		echo "FAILED: $name" >&2
		fails=$((fails + 1))
	fi
}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

"$demo" --conninfo "$PGSCOPE_TEST_CONNINFO" tour >"$out" 2>&1
rc=$?
cat "$out"
expect "tour exits 0" test "$rc" -eq 0
expect "tour: every check held" grep -q '^every check held$' "$out"
expect "tour: no failed check" bash -c "! grep -q 'FAIL' '$out'"
expect "tour: backend gone after cancel and timeout" test "$(grep -c '\[ok\]   backend gone' "$out")" -eq 2
expect "tour: invariant held" grep -q 'invariant held' "$out"
expect "tour: the overdraft's SQLSTATE shown" grep -q 'SQLSTATE 23514' "$out"

"$demo" --conninfo "$PGSCOPE_TEST_CONNINFO" transfer --count 2000 >"$out" 2>&1
rc=$?
cat "$out"
expect "transfer exits 0" test "$rc" -eq 0
expect "transfer: 2000 done" grep -q '2000 transfers in' "$out"
expect "transfer: invariant held" grep -q '\[ok\]   invariant held' "$out"

"$demo" --conninfo "host=127.0.0.1 port=1 password=DemoSecret1" commit >"$out" 2>&1
rc=$?
cat "$out"
expect "unreachable server: exit 2" test "$rc" -eq 2
expect "unreachable server: one line" test "$(wc -l <"$out")" -eq 1
expect "unreachable server: no password" bash -c "! grep -q DemoSecret1 '$out'"
"$demo" --conninfo "$PGSCOPE_TEST_CONNINFO" nonsense >"$out" 2>&1
expect "unknown scenario: exit 2" test $? -eq 2

echo "demo: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
