#!/usr/bin/env bash
# setup-test.sh: tools/setup.sh's package check, sourced the way tools/run-tests and
# tools/run-demo source it (under `set -euo pipefail`). is_installed must say "installed" for an
# installed package every time, also for packages whose `dpkg -s` output is longer than a pipe
# write (libc6-dev: 4.5 KiB; a `dpkg -s | grep -q` lost that race about one time in five), and
# "missing" for a package that is not installed; a prepared machine must not run apt-get.
# No server. Ends with `setup: N passed, M failed`.
set -euo pipefail

repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
# shellcheck source=tools/setup.sh
. "$repo/tools/setup.sh"

if ! command -v dpkg-query >/dev/null; then
	echo "setup: not a Debian system, nothing to test" >&2
	exit 77 # meson: skipped
fi

# shellcheck source=tests/expect.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/expect.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The truth, read without a pipe: dpkg-query's whole output into a file, then its Status line.
truly_installed() {
	dpkg-query -s "$1" >"$tmp/status" 2>/dev/null || return 1
	grep -Eq '^Status: (install|hold) ok installed$' "$tmp/status"
}

# How often is_installed gives the right answer for $1 in $2 tries.
agrees() {
	local p=$1 tries=$2 want=0 i wrong=0
	truly_installed "$p" || want=1
	for ((i = 0; i < tries; i++)); do
		if is_installed "$p"; then
			((want == 0)) || wrong=$((wrong + 1))
		else
			((want == 1)) || wrong=$((wrong + 1))
		fi
	done
	((wrong == 0)) || echo "is_installed $p: wrong $wrong of $tries times" >&2
	((wrong == 0))
}

# The packages whose status paragraph is the longest: the ones a pipe would cut. All installed
# packages in one dpkg-query call, sizes counted by awk.
mapfile -t installed < <(dpkg-query -W -f='${db:Status-Status} ${binary:Package}\n' |
	awk '$1 == "installed" { print $2 }')
mapfile -t longest < <(dpkg-query -s "${installed[@]}" 2>/dev/null |
	awk '/^Package: / { p = $2 } { n[p] += length($0) + 1 } END { for (p in n) print n[p], p }' |
	sort -rn | awk '$2 != "libc6-dev" { print $2 }' | head -n 2)

expect "libc6-dev is installed (the builds need it)" truly_installed libc6-dev
for p in libc6-dev "${longest[@]}"; do
	expect "is_installed $p, 25 times" agrees "$p" 25
done
for p in "${PACKAGES[@]}"; do
	expect "is_installed $p, 3 times" agrees "$p" 3
done
expect "pgscope-no-such-package counts as missing" agrees pgscope-no-such-package 5
expect "pgscope-no-such-package is not installed" bash -c '! dpkg-query -W pgscope-no-such-package >/dev/null 2>&1'

# On a prepared machine install_missing makes no network calls: apt-get, sudo and env (which
# runs apt-get install) are shadowed by functions that only record that they were called, so
# nothing is installed either way.
all=1
for p in "${PACKAGES[@]}"; do
	truly_installed "$p" || all=0
done
if ((all)); then
	apt_calls=0
	apt-get() { apt_calls=$((apt_calls + 1)); }
	sudo() { apt_calls=$((apt_calls + 1)); }
	env() { apt_calls=$((apt_calls + 1)); }
	for ((i = 0; i < 3; i++)); do
		install_missing
	done
	unset -f apt-get sudo env
	expect "install_missing on a prepared machine runs no apt-get (3 times)" test "$apt_calls" -eq 0
else
	echo "setup: not every package in PACKAGES is installed; install_missing not checked" >&2
fi

echo "setup: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
