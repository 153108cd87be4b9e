# setup.sh: what the README's two commands (tools/run-tests, tools/run-demo) share: the Debian
# packages they need, installed only when missing, and configuring a meson build directory.
# Sourced, not run.

say() { printf '==> %s\n' "$*" >&2; }

# gcc brings libasan/libubsan through libgcc-12-dev; libc6-dev is only a Recommends of gcc, and
# --no-install-recommends would leave us without <stdio.h>. postgresql brings the server
# binaries (initdb, pg_ctl) and the postgres OS user the throwaway cluster runs as. pgbouncer:
# the `pooler` suite runs the guards behind a real transaction-mode pooler
# (tests/with-pgbouncer.sh starts a throwaway one; its service stays unused). openssl: the
# `tls` suite's server gets a throwaway CA and certificate (tools/pgtmp.sh --tls).
PACKAGES=(gcc libc6-dev pkg-config meson ninja-build libpq-dev libevent-dev check postgresql
	pgbouncer openssl)

# --- dependencies -----------------------------------------------------------------------------

# Installed means the state "install ok installed" (or "hold ok installed" after apt-mark hold):
# `dpkg -s` also succeeds (exit 0) for a removed package whose config files remain. No pipe:
# callers run under `set -o pipefail`, and `dpkg -s libc6-dev | grep -q` lost the race often
# (grep exits at the Status line, dpkg dies of SIGPIPE writing the rest of its 4.5 KiB), so
# installed packages counted as missing. One line per installed architecture (multiarch).
is_installed() {
	local status
	status=$(dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null) || return 1
	case $'\n'$status$'\n' in
	*$'\n''install ok installed'$'\n'* | *$'\n''hold ok installed'$'\n'*) return 0 ;;
	esac
	return 1
}

install_missing() {
	local p missing=() sudo=()
	if ! command -v dpkg >/dev/null; then
		say "not a Debian system: make sure these (or their equivalents) are installed: ${PACKAGES[*]}"
		return
	fi
	for p in "${PACKAGES[@]}"; do
		is_installed "$p" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	if [[ $(id -u) -ne 0 ]]; then
		command -v sudo >/dev/null ||
			{ say "missing packages: ${missing[*]}; run as root or install them"; exit 1; }
		sudo=(sudo)
	fi
	say "installing: ${missing[*]}"
	# One `apt-get update`, and only when something is missing: a prepared machine makes no
	# network calls.
	"${sudo[@]}" apt-get update
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y --no-install-recommends "${missing[@]}"
}

# --- build ------------------------------------------------------------------------------------

# Configures DIR with OPTIONS, reusing an existing configuration. A build dir written by another
# meson version cannot be reconfigured, only wiped.
setup() {
	local dir=$1
	shift
	if [[ -f $dir/meson-private/coredata.dat ]]; then
		meson setup --reconfigure "$dir" "$@" || meson setup --wipe "$dir" "$@"
	else
		meson setup "$dir" "$@"
	fi
}

