#!/usr/bin/env bash
# demo-test.sh DEMO: runs pgscope-demo's tour, a 2000-transfer run and a bulk run against the
# test server, and asserts on the exit status and on the facts it printed; that the README's
# sample of the tour has the shape of a real run; that --count and --rows are honoured where they
# apply and refused where they do not; that connect_timeout in the conninfo is obeyed; that
# errors are one line.
# The conninfo (and so the password) reaches the demo through its environment, never its argv.
set -uo pipefail
demo=$1
readme=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../README.md
# shellcheck source=tests/expect.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/expect.sh"
out=$(mktemp)
tmp=$(mktemp -d)
listener=
cleanup() {
	[[ -n $listener ]] && kill "$listener" 2>/dev/null
	rm -rf "$out" "$tmp"
}
trap cleanup EXIT
export PGSCOPE_DEMO_CONNINFO=$PGSCOPE_TEST_CONNINFO

"$demo" tour >"$out" 2>&1
rc=$?
cat "$out"
expect "tour exits 0" test "$rc" -eq 0
expect "tour: every check held" grep -q '^every check held$' "$out"
expect "tour: no failed check" bash -c "! grep -q 'FAIL' '$out'"
expect "tour: backend gone after cancel and timeout" test "$(grep -c '\[ok\]   backend gone' "$out")" -eq 2
expect "tour: invariant held" grep -q 'invariant held' "$out"
expect "tour: the overdraft's SQLSTATE shown" grep -q 'SQLSTATE 23514' "$out"
expect "tour: 500 transfers by default" grep -q '^  500 transfers in' "$out"

# The bulk part (100000 rows by default in the tour, 200000 alone): each check it prints held,
# with its rates.
# bulk_checks N: the lines of a bulk run of N rows in $out.
bulk_checks() {
	local n=$1 what=$2
	expect "$what: the header says $n rows in, $((5 * n)) streamed" \
		grep -q "^== bulk: $n rows in with COPY FROM STDIN, out with COPY TO STDOUT, $((5 * n)) streamed" "$out"
	expect "$what: COPY FROM STDIN's rate" \
		grep -Eq "^  COPY FROM STDIN: $n rows \([0-9.]+ MiB\) in [0-9.]+ s, [0-9]+ rows/s \(64 KiB writes; PGS_EAGAIN answers: [0-9]+, on_ready calls: [1-9][0-9]*\)" "$out"
	expect "$what: the server holds what COPY loaded" \
		grep -q "\[ok\]   the server holds the $n rows (PQcmdTuples $n), sum(amount) [0-9]* as written" "$out"
	expect "$what: COPY TO STDOUT's rate" \
		grep -Eq "^  COPY TO STDOUT: $n rows \([0-9.]+ MiB\) in [0-9.]+ s, [0-9]+ rows/s \(on_data calls: [1-9][0-9]*\)" "$out"
	expect "$what: every row exported" grep -q "\[ok\]   $n rows exported, as PQcmdTuples says" "$out"
	expect "$what: the export is the load, byte for byte" \
		grep -q '\[ok\]   the export is byte for byte what was loaded' "$out"
	expect "$what: the stream's rate" \
		grep -Eq "^  pgs_query_stream: $((5 * n)) rows \([0-9.]+ MiB of values\) in [0-9.]+ s, [0-9]+ rows/s \(on_rows calls: [1-9][0-9]*\)" "$out"
	expect "$what: every row streamed" \
		grep -q "\[ok\]   $((5 * n)) rows streamed, as PQcmdTuples says" "$out"
	expect "$what: the streamed sum is the server's" \
		grep -q "\[ok\]   the streamed sum equals the server's own sum" "$out"
	expect "$what: a stream stopped early" grep -q '\[ok\]   stopped early: the rest discarded' "$out"
	expect "$what: the aborted COPY reported PGS_ECANCELED, 57014" \
		grep -q '\[ok\]   the aborted COPY reported PGS_ECANCELED: .* (SQLSTATE 57014)' "$out"
	expect "$what: the aborted COPY left no row" \
		grep -q "\[ok\]   none of its rows is there: the table holds $n rows" "$out"
	expect "$what: a COPY's rows go with its transaction's rollback" \
		grep -q "\[ok\]   the transaction saw its COPY's rows; they went with its rollback" "$out"
	expect "$what: and stay with its commit" \
		grep -q "\[ok\]   committed: the table holds $((n + 1000)) rows" "$out"
	expect "$what: peak memory before and after" \
		test "$(grep -Ec '^  peak memory \(VmHWM\) (before|after): [0-9.]+ MiB' "$out")" -eq 2
	if ((asan)); then
		expect "$what: no memory check under AddressSanitizer (its quarantine)" \
			grep -q '^  peak memory not checked: under AddressSanitizer' "$out"
	else
		expect "$what: peak memory stayed flat" grep -q '\[ok\]   peak memory stayed flat' "$out"
	fi
}
# The transfer scenario's trace summary (its pool's pgs_hooks), against what the scenario itself
# counted: trace_checks N WHAT, for a run of N transfers in $out.
# shellcheck disable=SC2016 # the $ in the awk programs are awk's
trace_checks() {
	local n=$1 what=$2 line committed refused retries
	line=$(grep -E "^  $n transfers in [0-9.]+ s \([0-9]+/s\): [0-9]+ committed, [0-9]+ refused as overdrafts, [0-9]+ retries$" "$out")
	expect "$what: the transfer line" test -n "$line"
	read -r committed refused retries < <(sed -E 's/.*: ([0-9]+) committed, ([0-9]+) refused as overdrafts, ([0-9]+) retries$/\1 \2 \3/' <<<"$line")
	# Statements: every one traced at its start ended, and the counts say so.
	line=$(grep -E "^  trace \(the pool's pgs_hooks\): [0-9]+ statements ended \([0-9]+ started; the pool's resets included\), [0-9]+ failed$" "$out")
	expect "$what: trace: the statements line" test -n "$line"
	local ended started
	read -r ended started < <(sed -E 's/.*: ([0-9]+) statements ended \(([0-9]+) started.*/\1 \2/' <<<"$line")
	expect "$what: trace: statements started = ended (${started:-?} = ${ended:-?})" \
		test "${started:-x}" = "${ended:-y}"
	expect "$what: trace: at least 4 statements per transfer (BEGIN, 2 UPDATEs, COMMIT)" \
		test "${ended:-0}" -ge $((4 * n))
	# Transactions: one per transfer on its first attempt, one per retry, as the scenario counted.
	line=$(grep -E '^  trace: [0-9]+ transactions: [0-9]+ transfers, [0-9]+ retries$' "$out")
	expect "$what: trace: the transactions line" test -n "$line"
	local tx tx_transfers tx_retries
	read -r tx tx_transfers tx_retries < <(sed -E 's/.*: ([0-9]+) transactions: ([0-9]+) transfers, ([0-9]+) retries$/\1 \2 \3/' <<<"$line")
	expect "$what: trace: transfers = the scenario's ($n)" test "${tx_transfers:-x}" = "$n"
	expect "$what: trace: retries = the scenario's (${retries:-?})" test "${tx_retries:-x}" = "${retries:-y}"
	expect "$what: trace: transactions = transfers + retries" \
		test "${tx:-x}" = "$((n + ${retries:-0}))"
	expect "$what: trace: the demo's own check of the transactions held" \
		grep -q "\[ok\]   the trace saw every transfer once ($n) and every retry (${retries:-?}), each begun and ended" "$out"
	expect "$what: trace: the demo's own check of the statements held" \
		grep -q "\[ok\]   every statement traced at its start ended (${ended:-?})" "$out"
	# (A connection still opening when the pool closes is told as closed while opening.)
	expect "$what: trace: connections opened, none failed or lost" \
		grep -Eq "^  trace: connections opened [1-9][0-9]*, failed 0, closed while opening [0-9]+, lost 0, replaced [0-9]+$" "$out"
	# Acquire waits: the percentiles, over at least one grant per transfer, or "no acquire traces".
	line=$(grep -E '^  trace: (acquire wait p50 [0-9.]+ ms, p99 [0-9.]+ ms \([0-9]+ granted, [0-9]+ failed\)|no acquire traces)$' "$out")
	expect "$what: trace: the acquire line" test -n "$line"
	if [[ $line == *p50* ]]; then
		expect "$what: trace: p50 <= p99, and a grant per transfer at least" awk -v n="$n" '
			{ p50 = $5; p99 = $8; granted = substr($10, 2) + 0 }
			END { exit !(p50 + 0 <= p99 + 0 && granted >= n) }' <<<"$line"
	fi
	# The slowest statements: one to three, slowest first, each its text (a known statement's,
	# parameters as $n: never a value).
	awk '/^  trace: slowest statements / { on = 1; next }
		on && /^  trace:   [0-9.]+ ms  / { print; next } { on = 0 }' "$out" >"$tmp/slow"
	expect "$what: trace: 1 to 3 slowest statements" \
		test "$(wc -l <"$tmp/slow")" -ge 1 -a "$(wc -l <"$tmp/slow")" -le 3
	expect "$what: trace: slowest first" awk '{ ms = $2 + 0; if (NR > 1 && ms > last) bad = 1; last = ms }
		END { exit bad }' "$tmp/slow"
	expect "$what: trace: statement texts, no values" awk '{ sub(/^  trace: +[0-9.]+ ms  /, "") }
		/^(BEGIN|COMMIT|ROLLBACK|UPDATE demo_accounts SET balance = balance [-+] \$1::bigint WHERE id = \$2::int|CLOSE ALL|SET SESSION AUTHORIZATION DEFAULT|RESET ALL|UNLISTEN \*|SELECT pg_catalog.pg_advisory_unlock_all\(\)|DISCARD (TEMP|SEQUENCES|ALL))/ { next }
		{ print "not a statement text: " $0; bad = 1 } END { exit bad }' "$tmp/slow"
	# Outcomes by kind: committed and refused as the scenario counted; every other kind is an
	# attempt that was retried; each kind's attempts add up to its count.
	grep -E '^  trace: transactions [a-z ]+(, [A-Za-z0-9_ ]+)?: [0-9]+ \(on attempt 1: [0-9]+, 2: [0-9]+, 3 or later: [0-9]+\)$' \
		"$out" >"$tmp/kinds"
	expect "$what: trace: the committed kind = the scenario's commits (${committed:-?})" \
		grep -q "^  trace: transactions committed: ${committed:-x} " "$tmp/kinds"
	if [[ ${refused:-0} -gt 0 ]]; then
		expect "$what: trace: refused as overdrafts (${refused}) = rolled back with 23514" \
			grep -q "^  trace: transactions rolled back, SQLSTATE 23514: $refused " "$tmp/kinds"
	fi
	expect "$what: trace: the kinds add up to the transactions; the rest are the retries" awk \
		-v tx="${tx:-x}" -v retries="${retries:-x}" '
		{ match($0, /: [0-9]+ \(/); count = substr($0, RSTART + 2, RLENGTH - 4) + 0; sum += count
		  s = $0; sub(/.*\(on attempt 1: /, "", s); split(s, b, /, 2: |, 3 or later: |\)/)
		  if (b[1] + b[2] + b[3] != count) bad = 1
		  if ($0 !~ /transactions committed:/ && $0 !~ /SQLSTATE 23514:/) rest += count }
		END { exit !(!bad && sum == tx && rest == retries) }' "$tmp/kinds"
}
# In a sanitizer build the peak says nothing (ASan keeps freed memory): the demo says so.
asan=0
libs=$(ldd "$demo" 2>/dev/null || true) # (no pipe into grep -q: pipefail and SIGPIPE)
[[ $libs == *libasan* ]] && asan=1
bulk_checks 100000 "tour: bulk"
trace_checks 500 "tour: transfer"

# The README's sample of the tour (between the demo-sample markers) has the shape of this run:
# each of its lines, but for "..." (lines left out), is a line of the run, in the same order,
# once digits are one placeholder and account names another (which account pays depends on
# the balances earlier runs left).
shape() {
	sed -E 's/[0-9]+/0/g; s/\b(alice|bob|carol|dave|erin|frank|grace|heidi)\b/NAME/g'
}
awk '/<!-- demo-sample:begin -->/ { on = 1; next } /<!-- demo-sample:end -->/ { on = 0 }
	on && !/^```/' "$readme" >"$tmp/sample"
shape <"$tmp/sample" >"$tmp/sample.shape"
shape <"$out" >"$tmp/run.shape"
sample_matches() {
	awk 'NR == FNR { run[++n] = $0; next }
		$0 == "..." { next }
		{ found = 0
		  while (i < n) if (run[++i] == $0) { found = 1; break }
		  if (!found) { print "README sample line not in the run (in order): " $0; bad = 1; exit } }
		END { exit bad }' "$tmp/run.shape" "$tmp/sample.shape" >&2
}
expect "README: the tour sample is there" test "$(grep -cv '^\.\.\.$' "$tmp/sample")" -ge 20
expect "README: the tour sample has the shape of a real run" sample_matches

"$demo" tour --count 40 --rows 3000 >"$out" 2>&1
rc=$?
expect "tour --count 40 --rows 3000 exits 0" test "$rc" -eq 0
expect "tour --count 40: its transfer part runs 40" grep -q '^  40 transfers in' "$out"
expect "tour --count 40: the header says 40" grep -q '^== transfer: 40 random' "$out"
trace_checks 40 "tour --count 40: transfer"
expect "tour --rows 3000: its bulk part loads 3000" grep -q '^== bulk: 3000 rows in' "$out"

"$demo" bulk >"$out" 2>&1
rc=$?
cat "$out"
expect "bulk exits 0" test "$rc" -eq 0
expect "bulk: every check held" grep -q '^every check held$' "$out"
expect "bulk: no failed check" bash -c "! grep -q 'FAIL' '$out'"
expect "bulk: only the bulk scenario ran" test "$(grep -c '^== ' "$out")" -eq 1
bulk_checks 200000 "bulk"

"$demo" transfer --count 2000 >"$out" 2>&1
rc=$?
cat "$out"
expect "transfer exits 0" test "$rc" -eq 0
expect "transfer: 2000 done" grep -q '2000 transfers in' "$out"
expect "transfer: invariant held" grep -q '\[ok\]   invariant held' "$out"
trace_checks 2000 "transfer"

# Options for scenarios that take none: refused, in a clear message, before connecting.
for args in "commit --count 5" "cancel --concurrency 3" "--count 5 retry" "bulk --count 5"; do
	# shellcheck disable=SC2086 # word splitting intended
	"$demo" $args >"$out" 2>&1
	rc=$?
	cat "$out"
	expect "$args: exit 2" test "$rc" -eq 2
	expect "$args: says where the option applies" grep -q 'applies to transfer and tour, not to' "$out"
	expect "$args: connects to nothing" bash -c "! grep -q 'connected to' '$out'"
done
for args in "commit --rows 5" "transfer --rows 5"; do
	# shellcheck disable=SC2086 # word splitting intended
	"$demo" $args >"$out" 2>&1
	rc=$?
	cat "$out"
	expect "$args: exit 2" test "$rc" -eq 2
	expect "$args: says where the option applies" grep -q 'applies to bulk and tour, not to' "$out"
	expect "$args: connects to nothing" bash -c "! grep -q 'connected to' '$out'"
done
"$demo" bulk --rows 0 --check-args >"$out" 2>&1
expect "bulk --rows 0: exit 2" test $? -eq 2
expect "bulk --rows 0: says what --rows takes" grep -q -- '--rows must be a number from 1' "$out"
"$demo" bulk --rows 500 --check-args >"$out" 2>&1
expect "bulk --rows 500 --check-args: valid, exit 0" test $? -eq 0
"$demo" transfer --count 5 --concurrency 2 --check-args >"$out" 2>&1
expect "--check-args: valid arguments, exit 0" test $? -eq 0
expect "--check-args: nothing printed" test ! -s "$out"
"$demo" --check-args bogus >"$out" 2>&1
expect "--check-args: unknown scenario, exit 2" test $? -eq 2
expect "--check-args: unknown scenario named" grep -q 'no scenario "bogus"' "$out"

# --conninfo wins over PGSCOPE_DEMO_CONNINFO (which names the working server here).
"$demo" --conninfo "host=127.0.0.1 port=1" commit >"$out" 2>&1
rc=$?
cat "$out"
expect "--conninfo over the environment: exit 2" test "$rc" -eq 2
expect "--conninfo over the environment: one line" test "$(wc -l <"$out")" -eq 1

PGSCOPE_DEMO_CONNINFO="host=127.0.0.1 port=1 password=DemoSecret1" "$demo" commit >"$out" 2>&1
rc=$?
cat "$out"
expect "unreachable server: exit 2" test "$rc" -eq 2
expect "unreachable server: one line" test "$(wc -l <"$out")" -eq 1
expect "unreachable server: no password" bash -c "! grep -q DemoSecret1 '$out'"
"$demo" nonsense >"$out" 2>&1
expect "unknown scenario: exit 2" test $? -eq 2
"$demo" "host=127.0.0.1 password=DemoSecret1" >"$out" 2>&1
rc=$?
cat "$out"
expect "a conninfo given as the scenario: exit 2" test "$rc" -eq 2
expect "a conninfo given as the scenario: not echoed" bash -c "! grep -q DemoSecret1 '$out'"

# connect_timeout in the conninfo decides: a listener that accepts and never answers (python3:
# meson's own language, so always there), connect_timeout=2: the demo gives up after 2 s, not
# after its own 10 s default.
python3 -c '
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])
' >"$tmp/port" &
listener=$!
for ((i = 0; i < 100; i++)); do
	[[ -s $tmp/port ]] && break
	sleep 0.05
done
port=$(cat "$tmp/port")
expect "silent listener started" test -n "$port"
start=$(date +%s%N)
PGSCOPE_DEMO_CONNINFO="host=127.0.0.1 port=$port connect_timeout=2 password=DemoSecret1" \
	"$demo" commit >"$out" 2>&1
rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
cat "$out"
echo "connect_timeout=2 against a silent server: gave up after $ms ms"
expect "connect_timeout=2: exit 2" test "$rc" -eq 2
expect "connect_timeout=2: says it timed out" grep -q 'timed out after 2000 ms' "$out"
expect "connect_timeout=2: well under 10 s (< 8 s)" test "$ms" -lt 8000
expect "connect_timeout=2: no password" bash -c "! grep -q DemoSecret1 '$out'"
kill "$listener" 2>/dev/null
wait "$listener" 2>/dev/null
listener=

echo "demo: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
