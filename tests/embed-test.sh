#!/usr/bin/env bash
# embed-test.sh: the README's lines for embedding pgscope from a private prefix (between the
# embed markers), run as they stand: in a copy of the source tree (so nothing is written into
# the real one), with HOME a temp dir (the prefix is $HOME/opt/pgscope). The program they build
# calls pgs_version(); it must run without LD_LIBRARY_PATH and use the prefix's library.
# No server. Ends with `embed: N passed, M failed`.
set -uo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
# shellcheck source=tests/expect.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/expect.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

awk '/<!-- embed:begin -->/ { on = 1; next } /<!-- embed:end -->/ { on = 0 }
	on && !/^```/' "$repo/README.md" >"$tmp/lines.sh"
cat "$tmp/lines.sh"
expect "README: the embedding lines are there" test "$(grep -c . "$tmp/lines.sh")" -eq 3

# The source tree without build directories and git's store.
mkdir "$tmp/src" "$tmp/home"
tar -C "$repo" --exclude='./build*' --exclude=./.git -cf - . | tar -C "$tmp/src" -xf -
cat >"$tmp/src/app.c" <<'C'
#include <pgscope.h>
#include <stdio.h>

int main(void)
{
    const char *text;
    int n = pgs_version(&text);
    printf("pgscope %s\n", text);
    return n == PGSCOPE_VERSION_NUMBER ? 0 : 1;
}
C
(
	cd "$tmp/src" || exit 1
	export HOME=$tmp/home
	unset PKG_CONFIG_PATH LD_LIBRARY_PATH
	bash -euo pipefail "$tmp/lines.sh"
) >"$tmp/out" 2>&1
rc=$?
tail -n 20 "$tmp/out"
expect "the README's lines succeed" test "$rc" -eq 0
expect "installed into the prefix" test -f "$tmp/home/opt/pgscope/lib/pkgconfig/pgscope.pc"

version=$(sed -n 's/^#define PGSCOPE_VERSION "\(.*\)"$/\1/p' "$repo/include/pgscope.h")
env -u LD_LIBRARY_PATH "$tmp/src/app" >"$tmp/app.out" 2>&1
rc=$?
cat "$tmp/app.out"
expect "the program runs without LD_LIBRARY_PATH" test "$rc" -eq 0
expect "it says the library's version" grep -qx "pgscope $version" "$tmp/app.out"
expect "it uses the prefix's library" \
	bash -c "env -u LD_LIBRARY_PATH ldd '$tmp/src/app' | grep -q '$tmp/home/opt/pgscope/lib/libpgscope.so'"

echo "embed: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
