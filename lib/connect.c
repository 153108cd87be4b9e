/* Connecting: the conninfo parsed, host names looked up with evdns (never on the loop, as
 * libpq would), libpq's non-blocking handshake with one deadline for all hosts, and the
 * reasons a connect fails. pgs_conn_open lives here; the guard's life is conn.c's. */
#include "conn_private.h"

/* The hosts to try, one entry per address (a name resolved to several gives several), and
 * the options to start libpq with from any of them. libpq's PQconnectPoll moves to the next
 * host when one fails, but enforces no connect_timeout (its blocking connect does, per host):
 * so a host that accepts TCP and never answers would hold the whole deadline. When a host's
 * share runs out, the attempt is dropped and libpq starts again from the next entry. */
typedef struct connect_plan {
    int n;
    char **host, **addr, **port; /* entry i; port NULL when the conninfo gave none */
    int *order;                  /* the current PGconn's list: entry numbers, in order */
    int norder;
    int cur;                     /* the entry it tries now, as far as PQhost/PQport tell */
    char *given_up;              /* entries that had their share without an answer */
    loop_ev *timer;              /* the host's share of the deadline */
    char log[1200];              /* why entries given up before the current attempt failed */
} connect_plan;

/* libpq puts a startup error's SQLSTATE only in the verbose message text ("FATAL:  28P01: ...",
 * with a LOCATION line): take the code out and leave the words. */
static void connect_error(pgs_conn *c, pgs_error *e, const char *why)
{
    char msg[2048];
    snprintf(msg, sizeof msg, "%s", why);
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
    drop_lookups(c); /* (the plan: its host timer stops with it) */
    PQconninfoFree(c->parsed);
    c->parsed = NULL;
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
    trace_conn_open(c, NULL);
    cb(c, NULL, c->open_arg);
}

static void track_host(pgs_conn *c);

/* One step of the handshake. The socket may change between steps, so each step re-points a
 * one-shot watch at PQsocket() in the direction the poll asked for. */
void connect_step(pgs_conn *c, PostgresPollingStatusType st)
{
    if (st == PGRES_POLLING_READING || st == PGRES_POLLING_WRITING) {
        track_host(c);
        int want = st == PGRES_POLLING_READING ? LOOP_READ : LOOP_WRITE;
        if (loop_ev_watch_once(c->io, PQsocket(c->pg), want) == 0)
            return;
    }
    if (st == PGRES_POLLING_OK) {
        connected(c);
        return;
    }
    if (c->plan && *c->plan->log) { /* the hosts given up earlier, then libpq's own words */
        pgs_error e;
        char msg[sizeof c->plan->log + 600];
        snprintf(msg, sizeof msg, "%s%s", c->plan->log, PQerrorMessage(c->pg));
        connect_error(c, &e, msg);
        go_dead(c, &e);
        return;
    }
    pgs_error e;
    connect_error(c, &e, PQerrorMessage(c->pg));
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

static void plan_free(pgs_conn *c);

/* The host list and its lookups, once libpq has the addresses (or the connect is over). */
static void free_hosts(pgs_conn *c)
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

void drop_lookups(pgs_conn *c)
{
    free_hosts(c);
    plan_free(c);
}

/* Append "item" to a comma-separated list being built in buf. */
static void list_add(char *buf, size_t cap, const char *item, int first)
{
    size_t len = strlen(buf);
    snprintf(buf + len, cap - len, "%s%s", first ? "" : ",", item ? item : "");
}


static void plan_free(pgs_conn *c)
{
    connect_plan *p = c->plan;
    if (!p)
        return;
    for (int i = 0; i < p->n; i++) {
        free(p->host[i]);
        free(p->addr[i]);
        free(p->port[i]);
    }
    free(p->host);
    free(p->addr);
    free(p->port);
    free(p->order);
    free(p->given_up);
    if (p->timer)
        loop_ev_free(p->timer);
    free(p);
    c->plan = NULL;
}

static void plan_add(connect_plan *p, const char *host, const char *addr, const char *port,
                     int *ok)
{
    int i = p->n++;
    p->host[i] = strdup(host);
    p->addr[i] = strdup(addr);
    p->port[i] = port ? strdup(port) : NULL;
    *ok &= p->host[i] && p->addr[i] && (!port || p->port[i]);
}

static void start_attempt(pgs_conn *c);
static void on_host_timeout(void *arg, int what);

/* Build the plan from the host list and the names' addresses, then start libpq at its first
 * entry. gssencmode defaults to disable (see pgs_conn_open). */
static void start_libpq(pgs_conn *c)
{
    pgs_error e;
    connect_plan *p = NULL;
    if (c->nhosts > 0) {
        int cap = 0, ok = 1;
        for (int i = 0; i < c->nhosts; i++) {
            cap++;
            for (const char *a = c->hosts[i].addrs; a && *a; a++)
                cap += *a == ',';
        }
        p = calloc(1, sizeof *p);
        if (!p || !(p->host = calloc((size_t)cap, sizeof *p->host)) ||
            !(p->addr = calloc((size_t)cap, sizeof *p->addr)) ||
            !(p->port = calloc((size_t)cap, sizeof *p->port)) ||
            !(p->order = calloc((size_t)cap, sizeof *p->order)) ||
            !(p->given_up = calloc((size_t)cap, 1))) {
            c->plan = p;
            goto nomem;
        }
        c->plan = p;
        char why[400] = "";
        for (int i = 0; i < c->nhosts; i++) {
            host_slot *h = &c->hosts[i];
            if (!is_name(h->host)) {
                plan_add(p, h->host, "", h->port, &ok);
                continue;
            }
            if (!h->addrs) {
                size_t len = strlen(why);
                snprintf(why + len, sizeof why - len, "%scould not resolve host name \"%s\": %s",
                         len ? "; " : "", h->host, h->why);
                continue;
            }
            char *save = NULL;
            for (char *a = strtok_r(h->addrs, ",", &save); a; a = strtok_r(NULL, ",", &save))
                plan_add(p, h->host, a, h->port, &ok);
        }
        if (!ok)
            goto nomem;
        if (p->n == 0) {
            set_error(c, &e, PGS_ECONNECT, NULL, why);
            go_dead(c, &e);
            return;
        }
        if (p->n > 1) {
            /* Each host's share: connect_timeout (libpq's, per host) when the conninfo sets
             * it, else the whole deadline split evenly. */
            if (!c->per_host_ms && c->opts.connect_timeout_ms > 0)
                c->per_host_ms = c->opts.connect_timeout_ms / p->n;
            if (c->per_host_ms > 0 && !(p->timer = loop_ev_new(c->base, on_host_timeout, c)))
                goto nomem;
        }
    }
    if (p) {
        for (int i = 0; i < p->n; i++)
            p->order[i] = i;
        p->norder = p->n;
    }
    free_hosts(c);
    start_attempt(c);
    return;
nomem:
    set_error(c, &e, PGS_ENOMEM, NULL, NULL);
    go_dead(c, &e);
}

/* Start libpq on the plan's entries in p->order (the conninfo as it is, without a plan).
 * Resolved names: host keeps the name (TLS checks it) and hostaddr carries the number, so
 * libpq tries every address without a lookup. */
static void start_attempt(pgs_conn *c)
{
    const char *kw[64], *val[64];
    char *hosts = NULL, *addrs = NULL, *ports = NULL;
    int n = 0;
    pgs_error e;
    connect_plan *p = c->plan;
    if (p) {
        size_t cap = 16;
        for (int i = 0; i < p->n; i++)
            cap += strlen(p->host[i]) + strlen(p->addr[i]) + (p->port[i] ? strlen(p->port[i]) : 0) +
                   3;
        hosts = calloc(1, cap);
        addrs = calloc(1, cap);
        ports = calloc(1, cap);
        if (!hosts || !addrs || !ports)
            goto nomem;
        for (int k = 0; k < p->norder; k++) {
            int i = p->order[k];
            list_add(hosts, cap, p->host[i], k == 0);
            list_add(addrs, cap, p->addr[i], k == 0); /* "" for an address or a socket */
            list_add(ports, cap, p->port[i], k == 0);
        }
        p->cur = p->order[0];
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
        set_error(c, &e, PGS_EINVAL, NULL, PQerrorMessage(c->pg));
        go_dead(c, &e);
        goto out;
    }
    if (p && p->timer)
        loop_ev_timer(p->timer, c->per_host_ms);
    /* Per the libpq docs, the first poll waits as if PQconnectPoll said "writing". */
    if (loop_ev_watch_once(c->io, PQsocket(c->pg), LOOP_WRITE) != 0) {
        set_error(c, &e, PGS_ECONNECT, NULL, "could not watch the connection's socket");
        go_dead(c, &e);
    }
    goto out;
nomem:
    set_error(c, &e, PGS_ENOMEM, NULL, NULL);
    go_dead(c, &e);
out:
    free(hosts);
    free(addrs);
    free(ports);
}

/* Which entry libpq tries now. It moves on by itself when a host fails (and goes back to the
 * first for prefer-standby's second pass): each host gets its own share from its start. */
static void track_host(pgs_conn *c)
{
    connect_plan *p = c->plan;
    if (!p || !p->timer)
        return;
    const char *host = PQhost(c->pg), *addr = PQhostaddr(c->pg), *port = PQport(c->pg);
    for (int k = 0; k < p->norder; k++) {
        int i = p->order[k];
        if (strcmp(host ? host : "", p->host[i]) != 0 ||
            (*p->addr[i] && strcmp(addr ? addr : "", p->addr[i]) != 0) ||
            (p->port[i] && strcmp(port ? port : "", p->port[i]) != 0))
            continue;
        if (i != p->cur) {
            p->cur = i;
            loop_ev_timer(p->timer, c->per_host_ms);
        }
        return;
    }
}

/* Name the entry in a message, as libpq does: "host" (address), port P. */
static void describe_entry(connect_plan *p, int i, char *buf, size_t cap)
{
    snprintf(buf, cap, "server at \"%s\"%s%s%s, port %s", p->host[i], *p->addr[i] ? " (" : "",
             p->addr[i], *p->addr[i] ? ")" : "", p->port[i] ? p->port[i] : "(default)");
}

static void log_add(connect_plan *p, const char *text)
{
    size_t len = strlen(p->log);
    snprintf(p->log + len, sizeof p->log - len, "%s", text);
}

/* A host had its share and did not answer: give it up, note why, and start again from the
 * next entry (a new socket: the watch follows PQsocket). The last one's failure ends it. */
static void on_host_timeout(void *arg, int what)
{
    (void)what;
    pgs_conn *c = arg;
    connect_plan *p = c->plan;
    if (c->state != CS_CONNECTING || !c->pg || !p)
        return;
    char entry[300], line[400];
    /* what libpq noted of the entries before it in this attempt, then this one */
    const char *before = PQerrorMessage(c->pg);
    if (before && *before)
        log_add(p, before);
    describe_entry(p, p->cur, entry, sizeof entry);
    snprintf(line, sizeof line, "connection to %s failed: no answer within %d ms\n", entry,
             c->per_host_ms);
    log_add(p, line);
    /* The next list: the entries after it, and for prefer-standby those before it too (they
     * were tried as standbys only; libpq's second pass takes any server). */
    p->given_up[p->cur] = 1;
    const char *tsa = option(c->parsed, "target_session_attrs");
    int prefer = tsa && strcmp(tsa, "prefer-standby") == 0;
    int at = 0, n = 0;
    while (at < p->norder && p->order[at] != p->cur)
        at++;
    int *next = calloc((size_t)p->n, sizeof *next);
    for (int k = at + 1; next && k < p->norder; k++)
        next[n++] = p->order[k];
    for (int k = 0; next && prefer && k < at; k++)
        if (!p->given_up[p->order[k]])
            next[n++] = p->order[k];
    loop_ev_stop(c->io);
    PQfinish(c->pg);
    c->pg = NULL;
    if (!next) {
        pgs_error e;
        set_error(c, &e, PGS_ENOMEM, NULL, NULL);
        go_dead(c, &e);
        return;
    }
    free(p->order);
    p->order = next;
    p->norder = n;
    if (n == 0) {
        pgs_error e;
        set_error(c, &e, PGS_ETIMEDOUT, NULL, p->log);
        go_dead(c, &e);
        return;
    }
    start_attempt(c);
}

void connect_timed_out(pgs_conn *c)
{
    char msg[1600];
    int len = snprintf(msg, sizeof msg, "connection timed out after %d ms",
                       c->opts.connect_timeout_ms);
    connect_plan *p = c->plan;
    if (p && c->pg && p->cur < p->n) {
        char entry[300];
        describe_entry(p, p->cur, entry, sizeof entry);
        len += snprintf(msg + len, sizeof msg - (size_t)len, " (trying %s)", entry);
    }
    if (p && *p->log && len < (int)sizeof msg)
        snprintf(msg + len, sizeof msg - (size_t)len, "; before that:\n%s", p->log);
    pgs_error e;
    set_error(c, &e, PGS_ETIMEDOUT, NULL, msg);
    go_dead(c, &e);
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
        /* Nothing to look up. A list stays, for the plan (each host its share). */
        if (n < 2)
            free_hosts(c);
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
    if (timeout_s > 0) /* per host, as libpq applies it; libpq treats 1 as 2 s, so do we */
        c->per_host_ms = (timeout_s < 2 ? 2 : timeout_s) * 1000;
    if (c->opts.connect_timeout_ms == 0) {
        int hosts = 1;
        for (const char *h = option(c->parsed, "host"); h && *h; h++)
            hosts += *h == ',';
        c->opts.connect_timeout_ms =
            c->per_host_ms ? c->per_host_ms * hosts : DEFAULT_CONNECT_TIMEOUT_MS;
    }
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
