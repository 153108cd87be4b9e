#!/usr/bin/env bash
# pgtmp.sh: a throwaway PostgreSQL cluster for pgscope's tests, demo and benchmark.
# It creates a private cluster in a fresh temp dir, on a free loopback port, with a password
# user for TCP (so tests exercise real SCRAM authentication), and removes every trace afterwards.
#
# Usage:
#   tools/pgtmp.sh run [--tls] [--standby [--sync]] [--] CMD ARGS...
#                                         start a cluster, run CMD with the env below, tear down,
#                                         exit with CMD's status
#   eval "$(tools/pgtmp.sh start [--tls] [--standby [--sync]] [--owner PID])"
#                                         start a cluster, print `export VAR='value'` lines; a
#                                         detached watchdog removes the cluster when PID (default:
#                                         the calling shell) exits. Inside a pipeline or subshell
#                                         the parent is short-lived: pass --owner $$ there.
#   tools/pgtmp.sh stop [DIR]             stop and remove the cluster in DIR (default
#                                         $PGSCOPE_TMPDIR); idempotent
#   tools/pgtmp.sh pgctl ARGS...          pg_ctl -D "$PGSCOPE_PGDATA" ARGS as the right OS user,
#                                         e.g. `pgctl stop -m immediate` / `pgctl start -w`
#                                         (paths in ARGS must be absolute)
#   tools/pgtmp.sh pgctl-standby ARGS...  the same for the standby (PGSCOPE_STANDBY_PGDATA, else
#                                         $PGSCOPE_TMPDIR/standby; log: standby.log beside it)
#   tools/pgtmp.sh promote                promote the standby (pg_ctl promote -w): it ends recovery
#                                         and takes writes; the primary keeps running (stop it with
#                                         `pgctl stop` for a failover)
#   --tls (or PGSCOPE_PGTMP_TLS=1)        the server also speaks TLS (ssl = on), with a throwaway
#                                         CA made in the cluster's dir (needs openssl); without
#                                         it ssl stays off, so libpq's default sslmode=prefer
#                                         talks plain TCP to it
#   --standby (or PGSCOPE_PGTMP_STANDBY=1)
#                                         also a hot standby streaming from the primary: a
#                                         physical replication slot on the primary, pg_basebackup
#                                         -R into $PGSCOPE_TMPDIR/standby, started on a port of its
#                                         own; ready once it streams and a row written on the
#                                         primary has reached it
#   --sync (or PGSCOPE_PGTMP_SYNC=1)      implies --standby; the standby is synchronous
#                                         (synchronous_standby_names = its application_name,
#                                         pgscope_standby; synchronous_commit = remote_apply): a
#                                         COMMIT on the primary returns once the standby applied
#                                         it, so the row is visible there. While the standby is
#                                         down or promoted, commits on the primary wait.
#
# Environment given to CMD / printed by start:
#   PGSCOPE_TEST_CONNINFO    host=127.0.0.1 port=P user=pgscope password=W dbname=pgscope
#                            (the only variable the test suite reads)
#   PGSCOPE_SOCKET_CONNINFO  host=<socket dir> port=P user=pgscope dbname=pgscope (trust, no pw)
#   PGSCOPE_SOCKET_DIR, PGSCOPE_PORT, PGSCOPE_PGDATA, PGSCOPE_PGBIN, PGSCOPE_TMPDIR
#   PGSCOPE_TLS_CA           with --tls only: the CA certificate that signed the server's
#                            (subjectAltName DNS:localhost, IP:127.0.0.1), for sslrootcert=
#   PGSCOPE_TLS_OTHER_CA     with --tls only: an unrelated CA's certificate (for wrong-CA tests)
#   PGSCOPE_STANDBY_CONNINFO with --standby only: host=127.0.0.1 port=S user=pgscope password=W
#                            dbname=pgscope (the standby; same user, password and database)
#   PGSCOPE_STANDBY_PORT, PGSCOPE_STANDBY_PGDATA  with --standby only
#
# Input: PGSCOPE_PGBIN, if set, picks the PostgreSQL bin dir (default: the highest
# /usr/lib/postgresql/*/bin).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
PROG=pgtmp.sh

# The port range is above the usual service ports and below Linux's default ephemeral range
# (32768-60999 overlaps, but a bind that collides just makes us pick another port).
PORT_MIN=20000
PORT_SPAN=41000
PORT_TRIES=20

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '/^# Usage:/,/^# Environment/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# Highest installed server version: Debian can hold several side by side, and `pg_config
# --bindir` answers /usr/bin (libpq-dev's client wrappers), which has no initdb.
find_pgbin() {
	if [[ -n ${PGSCOPE_PGBIN:-} ]]; then
		[[ -x $PGSCOPE_PGBIN/initdb ]] || die "PGSCOPE_PGBIN=$PGSCOPE_PGBIN has no initdb"
		printf '%s\n' "$PGSCOPE_PGBIN"
		return
	fi
	local dir best=
	best=$(for dir in /usr/lib/postgresql/*/bin; do
		[[ -x $dir/initdb ]] && printf '%s\n' "$dir"
	done | sort -V | tail -n 1)
	if [[ -z $best ]] && command -v pg_config >/dev/null; then
		dir=$(pg_config --bindir)
		[[ -x $dir/initdb ]] && best=$dir
	fi
	if [[ -z $best ]] && command -v initdb >/dev/null; then
		best=$(dirname "$(command -v initdb)")
	fi
	[[ -n $best ]] || die "no PostgreSQL server found (install the postgresql package)"
	printf '%s\n' "$best"
}

# PostgreSQL refuses to run as root, so as root every server-side binary runs as the postgres
# OS user. The subshell cds into the cluster dir first: postgres may not be allowed into the
# caller's cwd (e.g. /root), and initdb/pg_ctl fail with "could not identify current
# directory" then. Hence paths given to as_pg must be absolute.
as_pg() {
	(
		cd "${TMP:-/}" 2>/dev/null || cd /
		if is_root; then
			exec runuser -u postgres -- "$@"
		else
			exec "$@"
		fi
	)
}

# From /dev/urandom: $RANDOM stops at 32767 and so covers only part of the range; 4 bytes keep
# the modulo bias negligible.
random_port() {
	local r
	r=$(od -An -N4 -tu4 /dev/urandom)
	printf '%d\n' $((PORT_MIN + r % PORT_SPAN))
}

# Something already accepts connections there (another cluster, a dev server).
port_is_taken() {
	(: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# 12 random bytes as 24 hex digits: safe inside SQL quotes and conninfo values as is.
random_password() {
	od -An -N12 -tx1 /dev/urandom | tr -d ' \n'
}

# Start time of a process (field 22 of /proc/PID/stat): a PID alone can be reused by an
# unrelated process after the owner exits; PID + start time cannot. Empty when not Linux.
proc_start_time() {
	local stat f
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
	# The command name (field 2) may contain spaces and ')': split after its last ')'.
	read -ra f <<<"${stat##*) }"
	# f[0] is field 3 (state): a zombie owner is dead already, only not yet reaped.
	[[ ${f[0]} == Z ]] && return 0
	printf '%s\n' "${f[19]}"
}

owner_alive() {
	local pid=$1 want=$2 now
	kill -0 "$pid" 2>/dev/null || [[ -d /proc/$pid ]] || return 1
	[[ -z $want ]] && return 0 # no /proc: kill -0 is all we have
	now=$(proc_start_time "$pid")
	[[ $now == "$want" ]]
}

# --- stop -------------------------------------------------------------------------------------

# Stop the server of cluster DIR and remove DIR. Safe to call twice, concurrently (watchdog
# and user), or on a half-built cluster.
stop_cluster() {
	local dir=$1 pgbin pid lockfd
	[[ -d $dir ]] || return 0
	dir=$(readlink -f "$dir")
	# Refuse to rm -rf anything this script did not create.
	[[ -f $dir/.pgscope ]] || die "$dir is not a pgtmp.sh cluster (no .pgscope marker)"

	# The watchdog and an explicit stop may race: one lock, and the loser finds DIR gone.
	if command -v flock >/dev/null; then
		exec {lockfd}<"$dir/.pgscope" || return 0 # removed meanwhile
		flock "$lockfd"
		if [[ ! -d $dir ]]; then
			exec {lockfd}<&-
			return 0
		fi
	fi

	# Kill the watchdog first so it does not try a second stop, but never ourselves (the
	# watchdog calls this function too). The cmdline check guards against PID reuse.
	if [[ -f $dir/watchdog.pid ]]; then
		pid=$(cat "$dir/watchdog.pid" 2>/dev/null || true)
		if [[ -n $pid && $pid != "$$" ]] &&
			tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "__watchdog $dir "; then
			kill "$pid" 2>/dev/null || true
		fi
	fi

	pgbin=$(cat "$dir/pgbin" 2>/dev/null || find_pgbin)
	# The standby (--standby) first: stopped after its primary it would keep retrying to
	# connect to it, and a synchronous primary's clients wait for it while it runs.
	stop_server "$dir" standby "$pgbin"
	stop_server "$dir" data "$pgbin"
	rm -rf -- "$dir" 2>/dev/null || { sleep 0.2; rm -rf -- "$dir"; }
	[[ -n ${lockfd:-} ]] && exec {lockfd}<&-
	return 0
}

# stop_server DIR SUBDIR PGBIN: stop the server whose data dir is DIR/SUBDIR, if it runs.
stop_server() {
	local dir=$1 data=$1/$2 pgbin=$3 pid
	[[ -f $data/postmaster.pid ]] || return 0
	# fast: roll back and disconnect clients, a clean shutdown. immediate: the fallback
	# when something hangs; the data is thrown away anyway.
	if ! TMP=$dir as_pg "$pgbin/pg_ctl" -D "$data" -m "${STOP_MODE:-fast}" -w -t 20 \
		stop >/dev/null 2>&1; then
		TMP=$dir as_pg "$pgbin/pg_ctl" -D "$data" -m immediate -w -t 10 stop \
			>/dev/null 2>&1 || true
	fi
	# Last resort: the postmaster is still there, so end it by its pid file.
	if [[ -f $data/postmaster.pid ]]; then
		pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
		if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
			log "server $pid did not stop; killing it"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.5
		fi
	fi
}

# --- start ------------------------------------------------------------------------------------

# Sets TMP, PGBIN, PORT, PASSWORD, DATA, SOCK; the watchdog follows WATCH_OWNER. Progress goes
# to stderr; on failure the caller's EXIT trap removes TMP.
start_cluster() {
	PGBIN=$(find_pgbin)
	if is_root; then
		id -u postgres >/dev/null 2>&1 ||
			die "running as root needs the 'postgres' OS user (PostgreSQL refuses to run as root)"
	fi

	# Always /tmp, not $TMPDIR: a Unix socket path must fit in 107 bytes, and as root every
	# parent dir must be traversable by postgres, which a private $TMPDIR may not be.
	TMP=$(mktemp -d /tmp/pgscope.XXXXXX)
	# 711: the client (maybe another user) must traverse into the socket dir; listing is not
	# needed. Without it the connection fails with an error that looks like "no such file".
	chmod 711 "$TMP"
	: >"$TMP/.pgscope"
	printf '%s\n' "$PGBIN" >"$TMP/pgbin"
	# Watch from the first moment: if the owner dies (or this script is SIGKILLed) even
	# during start-up, the cluster still goes away.
	spawn_watchdog "$WATCH_OWNER"
	DATA=$TMP/data
	SOCK=$TMP/sock
	mkdir -m 700 "$DATA"
	mkdir -m 755 "$SOCK"
	# pg_ctl -l appends to the log as the server user, so create it for that user up front
	# (postgres cannot create files in the root-owned TMP).
	: >"$TMP/log"
	if is_root; then
		chown postgres: "$DATA" "$SOCK" "$TMP/log"
	fi

	log "initdb in $DATA ($PGBIN)"
	local out
	if ! out=$(as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth-local=trust \
		--auth-host=scram-sha-256 --no-locale -E UTF8 --no-sync 2>&1); then
		printf '%s\n' "$out" >&2
		die "initdb failed"
	fi

	# Replace initdb's file entirely: trust on the socket for setup and tools, a real password
	# check on TCP so the tests authenticate like an application does. Nothing else listens.
	cat >"$DATA/pg_hba.conf" <<-'EOF'
		# pgtmp.sh: throwaway cluster
		local all all trust
		host  all all 127.0.0.1/32 scram-sha-256
	EOF
	# --standby: "all" does not cover replication connections. The standby streams over the
	# socket as postgres (trust, so no password in its primary_conninfo); TCP as for the rest.
	if [[ -n $STANDBY ]]; then
		cat >>"$DATA/pg_hba.conf" <<-'EOF'
			local replication all trust
			host  replication all 127.0.0.1/32 scram-sha-256
		EOF
	fi

	# Settings live in a file the server reads at every start, not on the pg_ctl command line,
	# so `pgtmp.sh pgctl start` after a crash test comes back on the same port with the same
	# options. postgresql.conf includes it last, so it overrides initdb's defaults.
	printf "\n# pgtmp.sh\ninclude = 'pgscope.conf'\n" >>"$DATA/postgresql.conf"
	if [[ -n $TLS ]]; then
		make_tls
	fi

	start_on_free_port server "$TMP/log"

	create_role_and_db
	check_password_login
	if [[ -n $TLS ]]; then
		check_tls_login
	fi
	if [[ -n $STANDBY ]]; then
		start_standby
	fi
	log "ready: 127.0.0.1:$PORT, socket $SOCK, dir $TMP"
}

# start_on_free_port WHAT LOG: start the server of DATA on a free loopback port (its settings
# written by write_settings for each port tried), logging to LOG; sets PORT. Used for the
# primary and, with DATA and PORT made local by the caller, for the standby.
start_on_free_port() {
	local what=$1 logfile=$2 try port_ok=
	for ((try = 1; try <= PORT_TRIES; try++)); do
		PORT=$(random_port)
		port_is_taken "$PORT" && continue
		write_settings
		: >"$logfile"
		log "starting $what on 127.0.0.1:$PORT"
		if as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$logfile" -w -t 60 start >/dev/null 2>&1; then
			port_ok=1
			break
		fi
		# Another process (maybe a parallel run) bound the port between our check and the
		# server's bind: try another. Any other failure is real.
		if grep -q 'Address already in use\|could not create any TCP/IP sockets' "$logfile"; then
			log "port $PORT is in use, trying another"
			continue
		fi
		tail -n 20 "$logfile" >&2 || true
		die "$what failed to start (log above)"
	done
	[[ -n $port_ok ]] || die "no free port after $PORT_TRIES tries"

	# pg_ctl -w saw the pid file say "ready"; pg_isready proves TCP accepts connections.
	local i
	for ((i = 0; i < 40; i++)); do
		"$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1 && break
		sleep 0.25
	done
	((i < 40)) || die "$what on port $PORT did not become ready"
}

write_settings() {
	# unix_socket_directories: our own dir, not /var/run/postgresql (root-owned, and shared
	# with a system server). fsync etc. off: the data is thrown away, speed matters.
	# No logging_collector: the server's stderr goes to $TMP/log through pg_ctl -l.
	cat >"$DATA/pgscope.conf" <<-EOF
		listen_addresses = '127.0.0.1'
		port = $PORT
		unix_socket_directories = '$SOCK'
		max_connections = 150
		shared_buffers = 64MB
		fsync = off
		synchronous_commit = off
		full_page_writes = off
		password_encryption = 'scram-sha-256'
		logging_collector = off
		log_min_messages = warning
	EOF
	# Off unless asked: with ssl on, every client with libpq's default sslmode=prefer would pay
	# for a TLS handshake. ssl_ca_file only lets clients present certificates; none must.
	if [[ -n $TLS ]]; then
		cat >>"$DATA/pgscope.conf" <<-EOF
			ssl = on
			ssl_cert_file = '$TMP/tls/server.crt'
			ssl_key_file = '$TMP/tls/server.key'
			ssl_ca_file = '$TMP/tls/ca.crt'
		EOF
	fi
	# --standby: the server's defaults (wal_level replica, 10 WAL senders and slots, hot_standby
	# on), stated so that a standby never depends on them. Primary and standby get the same
	# file, so the standby's limits are never below its primary's, as hot standby requires.
	if [[ -n $STANDBY ]]; then
		cat >>"$DATA/pgscope.conf" <<-EOF
			wal_level = replica
			max_wal_senders = 10
			max_replication_slots = 10
			hot_standby = on
		EOF
	fi
	# --sync, on the primary once its standby streams (before, the role and database the
	# standby is copied with could not commit). Overrides synchronous_commit = off above.
	if [[ -n ${SYNC_ON:-} ]]; then
		cat >>"$DATA/pgscope.conf" <<-EOF
			synchronous_standby_names = '$STANDBY_NAME'
			synchronous_commit = remote_apply
		EOF
	fi
	if is_root; then
		chown postgres: "$DATA/pgscope.conf"
	fi
}

# --- the standby (--standby) ------------------------------------------------------------------

# Its application_name (in the primary_conninfo pg_basebackup -R writes, so pg_stat_replication
# and synchronous_standby_names know it by that name) and its replication slot's name.
STANDBY_NAME=pgscope_standby

# sql_at PORT DB SQL: run SQL as postgres over the socket (trust: no password involved);
# prints the first column of the result, unaligned.
sql_at() {
	as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 \
		"host=$SOCK port=$1 user=postgres dbname=$2" -c "$3"
}

# poll_for SECONDS WANT PORT DB SQL: until SQL (errors ignored) prints WANT; fails otherwise.
poll_for() {
	local tries=$(($1 * 4)) want=$2 i
	shift 2
	for ((i = 0; i < tries; i++)); do
		[[ $(sql_at "$@" 2>/dev/null) == "$want" ]] && return 0
		sleep 0.25
	done
	return 1
}

# Sets STANDBY_DATA, STANDBY_PORT: a slot on the primary, a base backup of it (its WAL streamed
# alongside, so the copy is consistent on its own), the standby started from it, then proof that
# it replicates: the primary sees it streaming, it is in recovery, a row written on the primary
# arrives, and it takes the password over TCP like the primary.
start_standby() {
	local out
	STANDBY_DATA=$TMP/standby
	# As for the primary: postgres cannot create anything in the root-owned TMP.
	mkdir -m 700 "$STANDBY_DATA"
	: >"$TMP/standby.log"
	if is_root; then
		chown postgres: "$STANDBY_DATA" "$TMP/standby.log"
	fi
	log "replication slot $STANDBY_NAME and a base backup into $STANDBY_DATA"
	if ! out=$(sql_at "$PORT" postgres \
		"SELECT pg_create_physical_replication_slot('$STANDBY_NAME')" 2>&1); then
		printf '%s\n' "$out" >&2
		die "creating the replication slot failed"
	fi
	# -R writes standby.signal and primary_conninfo (this conninfo: the socket, trust, no
	# password) plus primary_slot_name. -c fast: no wait for a spread checkpoint.
	if ! out=$(as_pg "$PGBIN/pg_basebackup" -D "$STANDBY_DATA" -R -S "$STANDBY_NAME" \
		-X stream -c fast --no-sync \
		-d "host=$SOCK port=$PORT user=postgres application_name=$STANDBY_NAME" 2>&1); then
		printf '%s\n' "$out" >&2
		die "pg_basebackup failed"
	fi
	launch_standby

	if ! poll_for 30 streaming "$PORT" postgres \
		"SELECT state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'"; then
		tail -n 20 "$TMP/standby.log" >&2 || true
		die "the standby does not stream from the primary (its log above)"
	fi
	[[ $(sql_at "$STANDBY_PORT" postgres 'SELECT pg_is_in_recovery()') == t ]] ||
		die "the standby on port $STANDBY_PORT is not in recovery"
	if [[ -n $SYNC ]]; then
		log "making the standby synchronous"
		SYNC_ON=1 write_settings
		as_pg "$PGBIN/pg_ctl" -D "$DATA" reload >/dev/null
		poll_for 30 sync "$PORT" postgres \
			"SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'" ||
			die "the standby did not become synchronous"
	fi
	# A row through replication, in the postgres database (the tests' database stays as it
	# was); the table goes again once it arrived.
	sql_at "$PORT" postgres "CREATE TABLE pgtmp_probe AS SELECT 'replicated'::text AS v" \
		>/dev/null
	poll_for 30 replicated "$STANDBY_PORT" postgres 'SELECT v FROM pgtmp_probe' ||
		die "a row written on the primary did not reach the standby"
	sql_at "$PORT" postgres 'DROP TABLE pgtmp_probe' >/dev/null
	PORT=$STANDBY_PORT check_password_login
	if [[ -n $TLS ]]; then
		PORT=$STANDBY_PORT check_tls_login
	fi
	log "standby ready: 127.0.0.1:$STANDBY_PORT, streaming${SYNC:+ (synchronous)}, dir $STANDBY_DATA"
}

# The standby's start: the copy holds the primary's pgscope.conf (its port); write_settings
# rewrites it for the standby's port, DATA and PORT being local here.
launch_standby() {
	local DATA=$STANDBY_DATA PORT
	start_on_free_port standby "$TMP/standby.log"
	STANDBY_PORT=$PORT
}

# The --tls material, all in $TMP/tls and gone with the cluster: a CA (self-signed), the server's
# key and a certificate from that CA for localhost and 127.0.0.1 (so sslmode=verify-full works
# with host=localhost), and a second, unrelated CA. EC P-256 keys: generated in milliseconds.
# The CA keys are deleted once they signed; the server key is 0600, owned by the server's user.
make_tls() {
	command -v openssl >/dev/null || die "--tls needs the openssl command (apt-get install openssl)"
	local out
	mkdir -m 711 "$TMP/tls"
	if ! out=$(make_tls_files "$TMP/tls" 2>&1); then
		printf '%s\n' "$out" >&2
		die "making the TLS certificates failed"
	fi
	if is_root; then
		chown postgres: "$TMP/tls/server.key"
	fi
}

# In a subshell: umask 077 makes each key file private from the moment it exists. Chained with
# &&: set -e does not act inside the caller's `if`.
make_tls_files() (
	umask 077
	cd "$1" || exit 1
	ca() { # NAME CN
		openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-keyout "$1.key" -out "$1.crt" -days 7 -subj "/CN=$2" \
			-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
	}
	ca ca "pgtmp.sh throwaway CA" &&
		ca other-ca "pgtmp.sh unrelated CA" &&
		openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-keyout server.key -out server.csr -subj "/CN=localhost" &&
		printf '%s\n' 'subjectAltName = DNS:localhost, IP:127.0.0.1' \
			'basicConstraints = critical, CA:FALSE' 'keyUsage = critical, digitalSignature' \
			'extendedKeyUsage = serverAuth' >server.ext &&
		openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key \
			-set_serial "0x$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" -days 7 \
			-extfile server.ext -out server.crt &&
		rm -f ca.key other-ca.key server.csr server.ext &&
		chmod 644 ca.crt other-ca.crt server.crt
)

create_role_and_db() {
	local out
	PASSWORD=$(random_password)
	# The SQL goes through stdin, never argv, so the password is not visible in ps.
	# log_min_error_statement=panic: if a statement fails the server would otherwise log its
	# text, password included; psql's own error output is redacted below for the same reason.
	if ! out=$(as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 \
		"host=$SOCK port=$PORT user=postgres dbname=postgres" 2>&1 <<-EOF
		SET log_min_error_statement = panic;
		SET password_encryption = 'scram-sha-256';
		CREATE ROLE pgscope LOGIN SUPERUSER PASSWORD '$PASSWORD';
		CREATE DATABASE pgscope OWNER pgscope;
	EOF
	); then
		printf '%s\n' "${out//$PASSWORD/<redacted>}" >&2
		die "creating role and database failed"
	fi
}

# Prove that TCP really asks for the password: the right one works, a wrong one is refused.
# Otherwise a misconfigured pg_hba.conf would let every test pass without authentication.
check_password_login() {
	local tcp="host=127.0.0.1 port=$PORT user=pgscope dbname=pgscope" out
	# PGPASSWORD (the environment, readable only by us), not argv; PGPASSFILE so a user's
	# ~/.pgpass cannot supply a password of its own.
	if ! out=$(PGPASSWORD=$PASSWORD PGPASSFILE=/dev/null \
		"$PGBIN/psql" -X -q -w -v ON_ERROR_STOP=1 -At "$tcp" -c 'SELECT 1' 2>&1); then
		printf '%s\n' "${out//$PASSWORD/<redacted>}" >&2
		die "password login over TCP failed"
	fi
	if out=$(PGPASSWORD=wrong PGPASSFILE=/dev/null \
		"$PGBIN/psql" -X -q -w -At "$tcp" -c 'SELECT 1' 2>&1); then
		die "TCP login with a wrong password succeeded: pg_hba.conf does not check passwords"
	fi
	[[ $out == *"password authentication failed"* ]] ||
		die "unexpected error for a wrong password: $out"
}

# With --tls: the certificates are right (verify-full with our CA and host name) and the session
# is really encrypted.
check_tls_login() {
	local out tls="host=localhost hostaddr=127.0.0.1 port=$PORT user=pgscope dbname=pgscope"
	tls+=" sslmode=verify-full sslrootcert=$TMP/tls/ca.crt"
	if ! out=$(PGPASSWORD=$PASSWORD PGPASSFILE=/dev/null "$PGBIN/psql" -X -q -w \
		-v ON_ERROR_STOP=1 -At "$tls" -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' \
		2>&1) || [[ $out != t ]]; then
		printf '%s\n' "${out//$PASSWORD/<redacted>}" >&2
		die "TLS login with sslmode=verify-full failed"
	fi
}

# One `export VAR='value'` per line, quoted for any POSIX shell.
export_lines() {
	local name val
	for name in PGSCOPE_TEST_CONNINFO PGSCOPE_SOCKET_CONNINFO PGSCOPE_SOCKET_DIR PGSCOPE_PORT \
		PGSCOPE_PGDATA PGSCOPE_PGBIN PGSCOPE_TMPDIR PGSCOPE_TLS_CA PGSCOPE_TLS_OTHER_CA \
		PGSCOPE_STANDBY_CONNINFO PGSCOPE_STANDBY_PORT PGSCOPE_STANDBY_PGDATA; do
		# The TLS ones without --tls, the standby's without --standby: not a stale value either.
		if [[ -z ${!name:-} ]]; then
			printf 'unset %s\n' "$name"
			continue
		fi
		val=${!name}
		printf "export %s='%s'\n" "$name" "${val//\'/\'\\\'\'}"
	done
}

set_env() {
	PGSCOPE_TEST_CONNINFO="host=127.0.0.1 port=$PORT user=pgscope password=$PASSWORD dbname=pgscope"
	PGSCOPE_SOCKET_CONNINFO="host=$SOCK port=$PORT user=pgscope dbname=pgscope"
	PGSCOPE_SOCKET_DIR=$SOCK
	PGSCOPE_PORT=$PORT
	PGSCOPE_PGDATA=$DATA
	PGSCOPE_PGBIN=$PGBIN
	PGSCOPE_TMPDIR=$TMP
	export PGSCOPE_TEST_CONNINFO PGSCOPE_SOCKET_CONNINFO PGSCOPE_SOCKET_DIR PGSCOPE_PORT \
		PGSCOPE_PGDATA PGSCOPE_PGBIN PGSCOPE_TMPDIR
	# Without --tls none, not an outer cluster's stale paths.
	unset PGSCOPE_TLS_CA PGSCOPE_TLS_OTHER_CA
	if [[ -n $TLS ]]; then
		export PGSCOPE_TLS_CA=$TMP/tls/ca.crt PGSCOPE_TLS_OTHER_CA=$TMP/tls/other-ca.crt
	fi
	# Likewise without --standby.
	unset PGSCOPE_STANDBY_CONNINFO PGSCOPE_STANDBY_PORT PGSCOPE_STANDBY_PGDATA
	if [[ -n $STANDBY ]]; then
		PGSCOPE_STANDBY_CONNINFO="host=127.0.0.1 port=$STANDBY_PORT user=pgscope"
		PGSCOPE_STANDBY_CONNINFO+=" password=$PASSWORD dbname=pgscope"
		export PGSCOPE_STANDBY_CONNINFO PGSCOPE_STANDBY_PORT=$STANDBY_PORT \
			PGSCOPE_STANDBY_PGDATA=$STANDBY_DATA
	fi
}

# The watchdog lives in its own session (setsid) with stdio on /dev/null: it must survive the
# caller's terminal and process group (meson kills a timed-out test's whole group with
# SIGKILL), and must not hold the caller's pipes open, or `$(pgtmp.sh start)` and meson would
# wait for it forever.
# The spawner records the PID, not the watchdog, so that nothing writes into the dir while
# stop removes it. (Our background jobs are not process group leaders, so setsid execs in place
# and $! is the watchdog itself.)
spawn_watchdog() {
	local owner=$1
	setsid "$SELF" __watchdog "$TMP" "$owner" "$(proc_start_time "$owner")" \
		</dev/null >/dev/null 2>&1 &
	printf '%s\n' "$!" >"$TMP/watchdog.pid"
}

watchdog() {
	local dir=$1 owner=$2 started=${3:-}
	trap '' HUP INT
	cd /
	# Ends by itself when the cluster is stopped by someone else (its marker disappears).
	while [[ -f $dir/.pgscope ]]; do
		if ! owner_alive "$owner" "$started"; then
			STOP_MODE=immediate stop_cluster "$dir"
			exit 0
		fi
		sleep 1
	done
}

# --- commands ---------------------------------------------------------------------------------

TMP=
TORN_DOWN=
case ${PGSCOPE_PGTMP_TLS:-} in
'' | 0) TLS= ;;
1) TLS=1 ;;
*) die "PGSCOPE_PGTMP_TLS must be 1 or 0, not '$PGSCOPE_PGTMP_TLS'" ;;
esac
case ${PGSCOPE_PGTMP_STANDBY:-} in
'' | 0) STANDBY= ;;
1) STANDBY=1 ;;
*) die "PGSCOPE_PGTMP_STANDBY must be 1 or 0, not '$PGSCOPE_PGTMP_STANDBY'" ;;
esac
case ${PGSCOPE_PGTMP_SYNC:-} in
'' | 0) SYNC= ;;
1) SYNC=1 STANDBY=1 ;;
*) die "PGSCOPE_PGTMP_SYNC must be 1 or 0, not '$PGSCOPE_PGTMP_SYNC'" ;;
esac
STANDBY_DATA=
STANDBY_PORT=
WATCH_OWNER=$PPID
CHILD=''

teardown() {
	[[ -n $TORN_DOWN || -z $TMP ]] && return 0
	TORN_DOWN=1
	stop_cluster "$TMP" || true
}

# run's signal handler: pass the signal on to CMD, tear down at once (immediate: meson gives a
# timed-out test only 0.5 s between SIGTERM and SIGKILL), exit like a signalled process.
on_signal() {
	trap - INT TERM HUP
	if [[ -n $CHILD ]]; then
		kill -TERM "$CHILD" 2>/dev/null || true
	fi
	STOP_MODE=immediate teardown
	exit $((128 + $1))
}

cmd_run() {
	while [[ $# -gt 0 ]]; do
		case $1 in
		--tls) TLS=1 ;;
		--standby) STANDBY=1 ;;
		--sync) SYNC=1 STANDBY=1 ;;
		*) break ;;
		esac
		shift
	done
	[[ ${1:-} == -- ]] && shift
	[[ $# -gt 0 ]] || usage
	local status=0
	trap teardown EXIT
	trap 'on_signal 2' INT
	trap 'on_signal 15' TERM
	trap 'on_signal 1' HUP

	# If this script is SIGKILLed, the traps cannot run; the watchdog still cleans up.
	WATCH_OWNER=$$
	start_cluster >&2
	set_env

	# Not exec: the cluster must be stopped afterwards. In the background plus `wait`, because
	# bash runs traps only after a foreground child exits, and a hung CMD must not block
	# teardown. Undo what bash does to background jobs, so CMD behaves as in the foreground:
	# `0<&0` keeps its stdin (else /dev/null), `trap -` lets Ctrl-C reach it (else SIGINT and
	# SIGQUIT are ignored, and e.g. meson would not stop on Ctrl-C).
	(
		trap - INT QUIT
		exec "$@"
	) 0<&0 &
	CHILD=$!
	wait "$CHILD" || status=$?
	CHILD=''
	teardown
	exit "$status"
}

cmd_start() {
	local owner=$PPID
	while [[ $# -gt 0 ]]; do
		case $1 in
		--owner)
			[[ ${2:-} =~ ^[0-9]+$ ]] || die "--owner needs a PID"
			owner=$2
			shift 2
			;;
		--owner=*)
			owner=${1#--owner=}
			[[ $owner =~ ^[0-9]+$ ]] || die "--owner needs a PID"
			shift
			;;
		--tls)
			TLS=1
			shift
			;;
		--standby)
			STANDBY=1
			shift
			;;
		--sync)
			SYNC=1 STANDBY=1
			shift
			;;
		*) usage ;;
		esac
	done
	kill -0 "$owner" 2>/dev/null || die "owner process $owner does not exist"

	trap teardown EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
	WATCH_OWNER=$owner
	start_cluster >&2
	set_env
	# From here on the cluster belongs to the caller (and the watchdog).
	trap - EXIT INT TERM HUP
	export_lines
	printf '# stop with: %s stop\n' "$SELF"
}

cmd_stop() {
	local dir=${1:-${PGSCOPE_TMPDIR:-}}
	[[ -n $dir ]] || die "stop: no DIR given and PGSCOPE_TMPDIR is not set"
	stop_cluster "$dir"
}

cmd_pgctl() {
	[[ -n ${PGSCOPE_PGDATA:-} ]] || die "pgctl: PGSCOPE_PGDATA is not set (run inside pgtmp.sh)"
	TMP=$(dirname "$PGSCOPE_PGDATA")
	local pgbin=${PGSCOPE_PGBIN:-$(find_pgbin)} arg has_log=
	for arg in "$@"; do
		[[ $arg == -l || $arg == --log* ]] && has_log=1
	done
	# Without -l the restarted server would write to our stdout/stderr and keep the caller's
	# pipes open; default to the cluster's own log.
	if [[ -z $has_log && ( ${1:-} == start || ${1:-} == restart ) ]]; then
		set -- "$@" -l "$TMP/log"
	fi
	as_pg "$pgbin/pg_ctl" -D "$PGSCOPE_PGDATA" "$@"
}

# The standby's data dir, for pgctl-standby and promote: PGSCOPE_STANDBY_PGDATA, else the one
# in PGSCOPE_TMPDIR. Sets TMP (the cluster's dir) and STANDBY_DATA.
find_standby() {
	STANDBY_DATA=${PGSCOPE_STANDBY_PGDATA:-}
	if [[ -z $STANDBY_DATA && -n ${PGSCOPE_TMPDIR:-} ]]; then
		STANDBY_DATA=$PGSCOPE_TMPDIR/standby
	fi
	[[ -n $STANDBY_DATA ]] ||
		die "$1: neither PGSCOPE_STANDBY_PGDATA nor PGSCOPE_TMPDIR is set (run inside pgtmp.sh)"
	TMP=$(dirname "$STANDBY_DATA")
	[[ -f $TMP/.pgscope && -d $STANDBY_DATA ]] ||
		die "$1: no pgtmp.sh standby in $STANDBY_DATA (started without --standby?)"
}

cmd_pgctl_standby() {
	find_standby pgctl-standby
	local pgbin=${PGSCOPE_PGBIN:-$(find_pgbin)} arg has_log=
	for arg in "$@"; do
		[[ $arg == -l || $arg == --log* ]] && has_log=1
	done
	# As pgctl: the standby's own log unless ARGS name one.
	if [[ -z $has_log && ( ${1:-} == start || ${1:-} == restart ) ]]; then
		set -- "$@" -l "$TMP/standby.log"
	fi
	as_pg "$pgbin/pg_ctl" -D "$STANDBY_DATA" "$@"
}

# The standby ends recovery and takes writes (-w: once it does). Its primary is left alone.
cmd_promote() {
	[[ $# -eq 0 ]] || usage
	find_standby promote
	local pgbin=${PGSCOPE_PGBIN:-$(find_pgbin)}
	as_pg "$pgbin/pg_ctl" -D "$STANDBY_DATA" -w -t 60 promote
}

main() {
	local cmd=${1:-}
	[[ $# -gt 0 ]] && shift
	case $cmd in
	run) cmd_run "$@" ;;
	start) cmd_start "$@" ;;
	stop) cmd_stop "$@" ;;
	pgctl) cmd_pgctl "$@" ;;
	pgctl-standby) cmd_pgctl_standby "$@" ;;
	promote) cmd_promote "$@" ;;
	__watchdog) watchdog "$@" ;;
	-h | --help | help) usage ;;
	*) usage ;;
	esac
}

main "$@"
