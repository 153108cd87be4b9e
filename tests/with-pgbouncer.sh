#!/usr/bin/env bash
# with-pgbouncer.sh CMD ARGS...: run CMD with a throwaway PgBouncer in front of the test server.
#
# The server is PGSCOPE_TEST_CONNINFO (keyword=value form); when it is unset this script runs
# itself again under tests/with-server.sh, so a bare `meson test` works. PgBouncer runs as the
# postgres OS user when we are root (it refuses to run as root), from a fresh temp dir, on
# 127.0.0.1 only, on a free port, in transaction mode with ONE server connection for all
# clients (default_pool_size=1), with SCRAM authentication against an auth_file that holds the
# password (written by bash built-ins: the password is never on a command line). Afterwards
# (also on failure or a signal) PgBouncer is stopped and the temp dir removed.
#
# The same user may open the admin console (dbname=pgbouncer), e.g. for RECONNECT.
#
# Environment given to CMD, besides what it got:
#   PGSCOPE_TEST_BOUNCER_CONNINFO  the server's conninfo with host=127.0.0.1 port=<bouncer>
#   PGSCOPE_TEST_BOUNCER_LOG       PgBouncer's log file (gone after CMD exits: print it from CMD)
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
PROG=with-pgbouncer.sh

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

[[ $# -gt 0 ]] || {
	echo "usage: $0 CMD ARGS..." >&2
	exit 2
}

if [[ -z ${PGSCOPE_TEST_CONNINFO:-} ]]; then
	exec "$(dirname "$SELF")/with-server.sh" "$SELF" "$@"
fi

is_root() { [[ $(id -u) -eq 0 ]]; }

# --- the server's conninfo ----------------------------------------------------------------------

# libpq's keyword/value syntax: `key=value` or `key = value`, values optionally in single quotes
# with backslash escapes. Fills KEYS and VALS in order.
KEYS=()
VALS=()
parse_conninfo() {
	local s=$1 i=0 n=${#1} key val c
	while :; do
		while ((i < n)) && [[ ${s:i:1} == [[:space:]] ]]; do i=$((i + 1)); done
		((i < n)) || return 0
		key=
		while ((i < n)) && [[ ${s:i:1} != [[:space:]=] ]]; do
			key+=${s:i:1}
			i=$((i + 1))
		done
		while ((i < n)) && [[ ${s:i:1} == [[:space:]] ]]; do i=$((i + 1)); done
		[[ -n $key && ${s:i:1} == = ]] || die "PGSCOPE_TEST_CONNINFO: expected keyword=value"
		i=$((i + 1))
		while ((i < n)) && [[ ${s:i:1} == [[:space:]] ]]; do i=$((i + 1)); done
		val=
		if [[ ${s:i:1} == "'" ]]; then
			i=$((i + 1))
			while :; do
				((i < n)) || die "PGSCOPE_TEST_CONNINFO: unterminated quoted value"
				c=${s:i:1}
				i=$((i + 1))
				[[ $c == "'" ]] && break
				if [[ $c == '\' ]] && ((i < n)); then
					c=${s:i:1}
					i=$((i + 1))
				fi
				val+=$c
			done
		else
			while ((i < n)) && [[ ${s:i:1} != [[:space:]] ]]; do
				c=${s:i:1}
				i=$((i + 1))
				if [[ $c == '\' ]] && ((i < n)); then
					c=${s:i:1}
					i=$((i + 1))
				fi
				val+=$c
			done
		fi
		KEYS+=("$key")
		VALS+=("$val")
	done
}

# The last value of a keyword (libpq: later keywords win), or $2.
ci_get() {
	local i out=$2
	for ((i = 0; i < ${#KEYS[@]}; i++)); do
		[[ ${KEYS[i]} == "$1" ]] && out=${VALS[i]}
	done
	printf '%s' "$out"
}

# A value as conninfo text: bare when it is plain, quoted otherwise.
ci_quote() {
	local v=$1
	if [[ $v =~ ^[A-Za-z0-9._/@:+-]+$ ]]; then
		printf '%s' "$v"
	else
		v=${v//\\/\\\\}
		printf "'%s'" "${v//\'/\\\'}"
	fi
}

[[ $PGSCOPE_TEST_CONNINFO != *://* ]] ||
	die "PGSCOPE_TEST_CONNINFO must be keyword=value, not a URI"
parse_conninfo "$PGSCOPE_TEST_CONNINFO"
SERVER_HOST=$(ci_get host "${PGHOST:-127.0.0.1}")
SERVER_PORT=$(ci_get port "${PGPORT:-5432}")
USER_NAME=$(ci_get user "${PGUSER:-$(id -un)}")
DB_NAME=$(ci_get dbname "$USER_NAME")
PASSWORD=$(ci_get password "${PGPASSWORD:-}")
[[ -n $PASSWORD ]] || die "the server's conninfo has no password (PgBouncer's auth_file needs one)"
[[ $SERVER_HOST != *,* && $SERVER_PORT != *,* ]] || die "one server host and port only"

PGBOUNCER=$(command -v pgbouncer || true)
[[ -n $PGBOUNCER ]] || PGBOUNCER=/usr/sbin/pgbouncer
[[ -x $PGBOUNCER ]] || die "pgbouncer is not installed (tools/setup.sh installs it)"
PSQL=$(command -v psql || true)
[[ -n $PSQL ]] || die "psql is not installed"
if is_root; then
	id -u postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' OS user"
fi

# --- start / stop -----------------------------------------------------------------------------

TMP=
PGB_PID=  # the background job (runuser, or pgbouncer itself when not root)
CHILD=
TORN_DOWN=

# The pgbouncer process: from its pid file, else the background job.
bouncer_pid() {
	local pid=
	[[ -n $TMP && -f $TMP/pgbouncer.pid ]] && read -r pid <"$TMP/pgbouncer.pid" 2>/dev/null
	[[ $pid =~ ^[0-9]+$ ]] || pid=$PGB_PID
	printf '%s' "$pid"
}

# SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients).
stop_bouncer() {
	local pid i
	pid=$(bouncer_pid)
	if [[ -n $pid ]]; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "pgbouncer $pid did not stop; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	if [[ -n $PGB_PID ]]; then
		kill -TERM "$PGB_PID" 2>/dev/null || true
		wait "$PGB_PID" 2>/dev/null || true
		PGB_PID=
	fi
}

teardown() {
	[[ -n $TORN_DOWN ]] && return 0
	TORN_DOWN=1
	stop_bouncer
	[[ -n $TMP ]] && rm -rf -- "$TMP"
	return 0
}

on_signal() {
	trap - INT TERM HUP
	if [[ -n $CHILD ]]; then
		kill -TERM "$CHILD" 2>/dev/null || true
	fi
	teardown
	exit $((128 + $1))
}

trap teardown EXIT
trap 'on_signal 2' INT
trap 'on_signal 15' TERM
trap 'on_signal 1' HUP

# /tmp, not $TMPDIR: as root every parent dir must be traversable by postgres. The dir belongs
# to postgres (PgBouncer writes its log and pid file there); root removes it afterwards.
TMP=$(mktemp -d /tmp/pgscope-bouncer.XXXXXX)
chmod 700 "$TMP"
is_root && chown postgres: "$TMP"

# auth_file: "user" "password", double quotes doubled. printf is a built-in: no argv exposure.
quote_auth() { printf '"%s"' "${1//\"/\"\"}"; }
(
	umask 077
	printf '%s %s\n' "$(quote_auth "$USER_NAME")" "$(quote_auth "$PASSWORD")" >"$TMP/userlist.txt"
)
is_root && chown postgres: "$TMP/userlist.txt"

# A random loopback port above the usual services, as pgtmp.sh picks the server's.
random_port() {
	local r
	r=$(od -An -N4 -tu4 /dev/urandom)
	printf '%d\n' $((20000 + r % 41000))
}
port_is_taken() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_config() {
	# `* =` routes every database name to the same-named database on the server, as the user
	# who logs in, with the password from the auth_file.
	cat >"$TMP/pgbouncer.ini" <<-EOF
		[databases]
		* = host=$SERVER_HOST port=$SERVER_PORT

		[pgbouncer]
		listen_addr = 127.0.0.1
		listen_port = $PORT
		unix_socket_dir =
		so_reuseport = 0
		auth_type = scram-sha-256
		auth_file = $TMP/userlist.txt
		pool_mode = transaction
		default_pool_size = 1
		min_pool_size = 0
		reserve_pool_size = 0
		max_db_connections = 1
		max_client_conn = 20
		logfile = $TMP/pgbouncer.log
		pidfile = $TMP/pgbouncer.pid
		log_connections = 1
		log_disconnections = 1
		ignore_startup_parameters = extra_float_digits,options
		admin_users = $USER_NAME
	EOF
	chmod 600 "$TMP/pgbouncer.ini"
	is_root && chown postgres: "$TMP/pgbouncer.ini"
	return 0
}

# psql through the bouncer; the password travels in the environment, never in argv.
bouncer_psql() { # PASSWORD SQL
	PGPASSWORD=$1 PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=2 "$PSQL" -X -q -w -At \
		"host=127.0.0.1 port=$PORT user=$USER_NAME dbname=$DB_NAME" -c "$2" 2>&1
}

started=
for ((try = 1; try <= 20; try++)); do
	PORT=$(random_port)
	port_is_taken "$PORT" && continue
	write_config
	rm -f "$TMP/pgbouncer.log" "$TMP/pgbouncer.pid"
	# exec all the way, so that $! is runuser (which passes SIGTERM on) or pgbouncer itself.
	(
		cd "$TMP"
		if is_root; then
			exec runuser -u postgres -- "$PGBOUNCER" "$TMP/pgbouncer.ini"
		fi
		exec "$PGBOUNCER" "$TMP/pgbouncer.ini"
	) </dev/null >"$TMP/stderr" 2>&1 &
	PGB_PID=$!
	# Ready when a query goes through it to the server (bounded: 10 s).
	for ((i = 0; i < 100; i++)); do
		kill -0 "$PGB_PID" 2>/dev/null || break
		if out=$(bouncer_psql "$PASSWORD" 'SELECT 1') && [[ $out == 1 ]]; then
			started=1
			break
		fi
		sleep 0.1
	done
	[[ -n $started ]] && break
	if ! kill -0 "$PGB_PID" 2>/dev/null &&
		grep -qs 'Address already in use' "$TMP/stderr" "$TMP/pgbouncer.log"; then
		log "port $PORT is in use, trying another"
		PGB_PID=
		continue
	fi
	tail -n 20 "$TMP/stderr" "$TMP/pgbouncer.log" >&2 2>/dev/null || true
	[[ -n ${out:-} ]] && log "last psql error: ${out//$PASSWORD/<redacted>}"
	die "pgbouncer did not start (see above)"
done
[[ -n $started ]] || die "no free port for pgbouncer after 20 tries"

# Prove the bouncer checks passwords: a wrong one is refused.
if out=$(bouncer_psql wrong-password 'SELECT 1'); then
	die "pgbouncer accepted a wrong password"
fi
log "pgbouncer $(bouncer_pid) on 127.0.0.1:$PORT (transaction mode, 1 server connection) in $TMP"

# --- run CMD ----------------------------------------------------------------------------------

conninfo=
for ((k = 0; k < ${#KEYS[@]}; k++)); do
	case ${KEYS[k]} in
	host | hostaddr | port) continue ;;
	esac
	conninfo+="${KEYS[k]}=$(ci_quote "${VALS[k]}") "
done
export PGSCOPE_TEST_BOUNCER_CONNINFO="${conninfo}host=127.0.0.1 port=$PORT"
export PGSCOPE_TEST_BOUNCER_LOG=$TMP/pgbouncer.log

# As pgtmp.sh runs CMD: in the background plus wait, so a signal reaches the traps at once.
status=0
(
	trap - INT QUIT
	exec "$@"
) 0<&0 &
CHILD=$!
wait "$CHILD" || status=$?
CHILD=
teardown
exit "$status"
