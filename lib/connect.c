/* Connecting: the conninfo parsed, host names looked up with evdns (never on the loop, as
 * libpq would), libpq's non-blocking handshake with one deadline for all hosts, and the
 * reasons a connect fails. pgs_conn_open lives here; the guard's life is conn.c's. */
#include "conn_private.h"

/* libpq puts a startup error's SQLSTATE only in the verbose message text ("FATAL:  28P01: ...",
 * with a LOCATION line): take the code out and leave the words. */
static void connect_error(pgs_conn *c, pgs_error *e)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", PQerrorMessage(c->pg));
    char sqlstate[6] = "";
    for (char *p = strstr(msg, "FATAL:  "); p; p = strstr(p, "FATAL:  ")) {
        p += 8;
        if (strspn(p, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") == 5 && p[5] == ':' && p[6] == ' ') {
            memcpy(sqlstate, p, 5);
            memmove(p, p + 7, strlen(p + 7) + 1);
        }
    }
    for (char *p = strstr(msg, "\nLOCATION:"); p; p = strstr(p, "\nLOCATION:")) {
        char *end = strchr(p + 1, '\n');
        if (!end) {
            *p = '\0';
            break;
        }
        memmove(p, end, strlen(end) + 1);
    }
    pgs_code code = PGS_ECONNECT;
    if (strncmp(sqlstate, "28", 2) == 0)
        code = PGS_EAUTH;
    else if (strcmp(sqlstate, "3D000") == 0)
        code = PGS_ENODB;
    set_error(c, e, code, sqlstate, msg);
}

static void connected(pgs_conn *c)
{
    loop_ev_stop(c->timer);
    PQsetErrorVerbosity(c->pg, PQERRORS_DEFAULT);
    if (PQsetnonblocking(c->pg, 1) != 0) {
        pgs_error e;
        set_error(c, &e, PGS_ECONNECT, NULL, PQerrorMessage(c->pg));
        go_dead(c, &e);
        return;
    }
    c->state = CS_READY;
    if (loop_ev_watch(c->io, PQsocket(c->pg), LOOP_READ) != 0) {
        lost_from_libpq(c);
        return;
    }
    send_list(c, &c->unsent);
    if (c->state != CS_READY)
        return;
    pgs_conn_cb cb = c->on_open;
    c->on_open = NULL;
    cb(c, NULL, c->open_arg);
}

/* One step of the handshake. The socket may change between steps, so each step re-points a
 * one-shot watch at PQsocket() in the direction the poll asked for. */
void connect_step(pgs_conn *c, PostgresPollingStatusType st)
{
    if (st == PGRES_POLLING_READING || st == PGRES_POLLING_WRITING) {
        int want = st == PGRES_POLLING_READING ? LOOP_READ : LOOP_WRITE;
        if (loop_ev_watch_once(c->io, PQsocket(c->pg), want) == 0)
            return;
    }
    if (st == PGRES_POLLING_OK) {
        connected(c);
        return;
    }
    pgs_error e;
    connect_error(c, &e);
    go_dead(c, &e);
}

/* One entry of the conninfo's comma-separated host list. */
typedef struct host_slot {
    const char *host;    /* points into conn->hostlist */
    const char *port;    /* points into conn->portlist, or NULL */
    pgs_conn *conn;
    loop_lookup *lookup; /* in flight */
    char *addrs;         /* a name's numeric addresses, comma-separated */
    char why[160];       /* why a name did not resolve */
} host_slot;

static const char *option(PQconninfoOption *opts, const char *keyword)
{
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0)
            return o->val && *o->val ? o->val : NULL;
    return NULL;
}

static int is_name(const char *host)
{
    return *host && *host != '/' && *host != '@' && !loop_is_numeric_host(host);
}

void drop_lookups(pgs_conn *c)
{
    for (int i = 0; i < c->nhosts; i++) {
        if (c->hosts[i].lookup)
            loop_lookup_cancel(c->hosts[i].lookup);
        free(c->hosts[i].addrs);
    }
    free(c->hosts);
    free(c->hostlist);
    free(c->portlist);
    c->hosts = NULL;
    c->hostlist = c->portlist = NULL;
    c->nhosts = c->lookups = 0;
}

/* Append "item" to a comma-separated list being built in buf. */
static void list_add(char *buf, size_t cap, const char *item)
{
    size_t len = strlen(buf);
    snprintf(buf + len, cap - len, "%s%s", len ? "," : "", item ? item : "");
}

/* Start libpq. Resolved names become one entry per address: host keeps the name (TLS checks
 * it) and hostaddr carries the number, so libpq tries every address without a lookup.
 * gssencmode defaults to disable (see pgs_conn_open). */
static void start_libpq(pgs_conn *c)
{
    const char *kw[64], *val[64];
    char *hosts = NULL, *addrs = NULL, *ports = NULL;
    int n = 0;
    if (c->nhosts > 0) {
        size_t cap = 16;
        for (int i = 0; i < c->nhosts; i++)
            cap += (strlen(c->hosts[i].host) + 64) * 4 +
                   (c->hosts[i].addrs ? strlen(c->hosts[i].addrs) * 8 : 0);
        hosts = calloc(1, cap);
        addrs = calloc(1, cap);
        ports = calloc(1, cap);
        if (!hosts || !addrs || !ports)
            goto nomem;
        char why[400] = "";
        for (int i = 0; i < c->nhosts; i++) {
            host_slot *h = &c->hosts[i];
            if (!is_name(h->host)) {
                list_add(hosts, cap, h->host);
                list_add(addrs, cap, "");
                list_add(ports, cap, h->port);
                continue;
            }
            if (!h->addrs) {
                size_t len = strlen(why);
                snprintf(why + len, sizeof why - len, "%scould not resolve host name \"%s\": %s",
                         len ? "; " : "", h->host, h->why);
                continue;
            }
            char *save = NULL;
            for (char *a = strtok_r(h->addrs, ",", &save); a; a = strtok_r(NULL, ",", &save)) {
                list_add(hosts, cap, h->host);
                list_add(addrs, cap, a);
                list_add(ports, cap, h->port);
            }
        }
        if (!*hosts) {
            pgs_error e;
            set_error(c, &e, PGS_ECONNECT, NULL, why);
            go_dead(c, &e);
            goto out;
        }
    }
    for (PQconninfoOption *o = c->parsed; o->keyword && n < 60; o++) {
        const char *v = o->val;
        if (hosts && strcmp(o->keyword, "host") == 0)
            v = hosts;
        else if (hosts && strcmp(o->keyword, "hostaddr") == 0)
            v = addrs;
        else if (hosts && strcmp(o->keyword, "port") == 0)
            v = option(c->parsed, "port") ? ports : NULL;
        else if (strcmp(o->keyword, "gssencmode") == 0 && !(v && *v) &&
                 !getenv("PGGSSENCMODE") && !option(c->parsed, "service") && !getenv("PGSERVICE"))
            /* libpq's default, prefer, has the first connect of a process look for Kerberos
             * credentials inside PQconnectPoll: tens of ms that block the loop. GSSAPI
             * encryption only when asked for (a service file may ask). */
            v = "disable";
        if (!v)
            continue;
        kw[n] = o->keyword;
        val[n++] = v;
    }
    if (hosts && !option(c->parsed, "hostaddr")) {
        kw[n] = "hostaddr";
        val[n++] = addrs;
    }
    kw[n] = val[n] = NULL;
    c->pg = PQconnectStartParams(kw, val, 0);
    if (!c->pg)
        goto nomem;
    PQsetNoticeReceiver(c->pg, conn_notice, c);
    /* Verbose only during start-up, to learn the SQLSTATE of a refused login. */
    PQsetErrorVerbosity(c->pg, PQERRORS_VERBOSE);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        pgs_error e;
        set_error(c, &e, PGS_EINVAL, NULL, PQerrorMessage(c->pg));
        go_dead(c, &e);
        goto out;
    }
    /* Per the libpq docs, the first poll waits as if PQconnectPoll said "writing". */
    if (loop_ev_watch_once(c->io, PQsocket(c->pg), LOOP_WRITE) != 0) {
        pgs_error e;
        set_error(c, &e, PGS_ECONNECT, NULL, "could not watch the connection's socket");
        go_dead(c, &e);
    }
    goto out;
nomem : {
    pgs_error e;
    set_error(c, &e, PGS_ENOMEM, NULL, NULL);
    go_dead(c, &e);
}
out:
    free(hosts);
    free(addrs);
    free(ports);
    drop_lookups(c);
    PQconninfoFree(c->parsed);
    c->parsed = NULL;
}

static void on_resolved(void *arg, const char *addrs, const char *why)
{
    host_slot *h = arg;
    pgs_conn *c = h->conn;
    h->lookup = NULL;
    if (addrs)
        h->addrs = strdup(addrs);
    else
        snprintf(h->why, sizeof h->why, "%s", why ? why : "lookup failed");
    if (--c->lookups == 0 && c->state == CS_CONNECTING)
        start_libpq(c);
}

/* Split host (and port) lists and start a lookup for each name. Returns 0 when no name needs
 * one (libpq handles numbers and socket paths without blocking), 1 when lookups run, -1 on
 * no memory. */
static int start_lookups(pgs_conn *c)
{
    const char *host = option(c->parsed, "host");
    if (!host || option(c->parsed, "hostaddr"))
        return 0; /* no host: a Unix socket; hostaddr given: the caller already resolved */
    int names = 0, n = 1;
    for (const char *p = host; *p; p++)
        n += *p == ',';
    const char *port = option(c->parsed, "port");
    c->hostlist = strdup(host);
    c->portlist = port ? strdup(port) : NULL;
    c->hosts = calloc((size_t)n, sizeof *c->hosts);
    if (!c->hostlist || (port && !c->portlist) || !c->hosts)
        return -1;
    char *h = c->hostlist, *p = c->portlist;
    for (int i = 0; i < n; i++) {
        char *comma = strchr(h, ',');
        if (comma)
            *comma = '\0';
        c->hosts[i].host = h;
        c->hosts[i].conn = c;
        h = comma ? comma + 1 : h + strlen(h);
        if (p) {
            char *pc = strchr(p, ',');
            if (pc)
                *pc = '\0';
            c->hosts[i].port = p;
            /* one port for all hosts, or one per host (libpq's rule) */
            if (pc)
                p = pc + 1;
        }
        names += is_name(c->hosts[i].host);
    }
    c->nhosts = n;
    if (names == 0) {
        drop_lookups(c);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        host_slot *s = &c->hosts[i];
        if (!is_name(s->host))
            continue;
        s->lookup = loop_resolve(c->base, s->host, on_resolved, s);
        if (!s->lookup)
            return -1;
        c->lookups++;
    }
    return 1;
}

int pgs_conn_open(struct event_base *base, const char *conninfo, const pgs_conn_opts *opts,
                  pgs_conn_cb on_open, void *arg, pgs_conn **out)
{
    if (out)
        *out = NULL;
    if (!base || !conninfo || !on_open || !out)
        return PGS_EINVAL;
    pgs_conn *c = conn_new(base, opts, on_open, arg);
    if (!c)
        return PGS_ENOMEM;
    *out = c;
    char *why = NULL;
    c->parsed = PQconninfoParse(conninfo, &why);
    pgs_error e;
    if (!c->parsed) {
        /* libpq's reason quotes a piece of the string, the password perhaps: not shown. */
        char msg[600] = "invalid connection string: ";
        size_t len = strlen(msg);
        if (why)
            err_conninfo_reason(msg + len, sizeof msg - len, conninfo);
        set_error(c, &e, why ? PGS_EINVAL : PGS_ENOMEM, NULL, why ? msg : NULL);
        PQfreemem(why);
        go_dead(c, &e);
        return PGS_OK;
    }
    const char *pw = option(c->parsed, "password");
    if (pw)
        c->password = strdup(pw);
    const char *t = option(c->parsed, "connect_timeout");
    if (!t) /* libpq's environment fills in what the conninfo leaves out */
        t = getenv("PGCONNECT_TIMEOUT");
    int timeout_s = t ? atoi(t) : 0;
    if (c->opts.connect_timeout_ms == 0) /* libpq treats 1 as 2 s; so do we */
        c->opts.connect_timeout_ms =
            timeout_s > 0 ? (timeout_s < 2 ? 2 : timeout_s) * 1000 : DEFAULT_CONNECT_TIMEOUT_MS;
    /* One deadline for the whole connect: lookups and every host libpq tries. */
    if (c->opts.connect_timeout_ms > 0)
        loop_ev_timer(c->timer, c->opts.connect_timeout_ms);
    int r = start_lookups(c);
    if (r < 0) {
        set_error(c, &e, PGS_ENOMEM, NULL, NULL);
        go_dead(c, &e);
    } else if (r == 0) {
        start_libpq(c);
    }
    return PGS_OK;
}
