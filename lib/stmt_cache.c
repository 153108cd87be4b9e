/* The statement cache: each distinct statement text is parsed once per connection, as a named
 * prepared statement (a name unique beyond the connection), and then executed by name; what
 * deallocates them empties it. Self-contained: pipeline.c asks it which name a statement
 * runs by, results.c tells it of statements that went stale. */
#include "conn_private.h"

#include <strings.h>

/* The cache's key: a hash of the text, eight bytes at a time (each statement is looked up, so
 * a byte-at-a-time hash costs in proportion to the SQL's length on every call). */
static uint64_t hash_sql(const char *s, size_t len)
{
    uint64_t h = 0x9e3779b97f4a7c15u ^ len, w;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9u;
        h ^= h >> 31;
    }
    w = 0;
    memcpy(&w, s + i, len - i);
    h = (h ^ w) * 0x94d049bb133111ebu;
    return h ^ (h >> 29);
}

void cache_clear(pgs_conn *c)
{
    if (!c->cache)
        return;
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (stmt *e = c->cache[i], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    free(c->cache);
    c->cache = NULL;
    c->cached = 0;
    c->last = NULL;
}

void cache_drop(pgs_conn *c, stmt *gone)
{
    if (!c->cache)
        return;
    for (stmt **pp = &c->cache[gone->hash % CACHE_BUCKETS]; *pp; pp = &(*pp)->next)
        if (*pp == gone) {
            if (c->last == gone)
                c->last = NULL;
            *pp = gone->next;
            free(gone);
            c->cached--;
            return;
        }
}

/* A cached statement's prepared statement is not on the server session that ran it: we
 * prepared it on this connection and did not drop it, so either something deallocated it
 * behind the cache's back or the session is not the one it was prepared on, which is what a
 * pooler in transaction mode does. Say so: the server's words alone point nowhere. */
void explain_missing_statement(pgs_conn *c, pgs_error *e)
{
    char msg[sizeof e->message + 320];
    snprintf(msg, sizeof msg,
             "%s: the statement cache prepared it on this connection, so the server session is "
             "not the one it was prepared on (a pooler in transaction mode, such as PgBouncer, "
             "in between: turn the cache off with pgs_conn_opts.statement_cache < 0) or it was "
             "deallocated behind the cache's back",
             e->message);
    char sqlstate[sizeof e->sqlstate];
    memcpy(sqlstate, e->sqlstate, sizeof sqlstate); /* (err_set writes e->sqlstate) */
    set_error(c, e, e->code, sqlstate, msg);
}

/* Drop the entry a statement ran by, if the cache still has it: an earlier failure or a
 * DEALLOCATE may have dropped it (and its address may hold a newer entry), so it is looked
 * for by address and number, never read through the op's pointer. */
void cache_forget(pgs_conn *c, op *o)
{
    if (!c->cache)
        return;
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (stmt *e = c->cache[i]; e; e = e->next)
            if (e == o->stmt && e->no == o->stmt_no) {
                cache_drop(c, e);
                return;
            }
}

/* The entry's Parse succeeded: it runs by name from any segment now (if the cache still has
 * it: looked for as cache_forget does; once per text and connection). */
void cache_confirm(pgs_conn *c, op *o)
{
    if (!c->cache)
        return;
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (stmt *e = c->cache[i]; e; e = e->next)
            if (e == o->stmt && e->no == o->stmt_no) {
                e->parsing = 0;
                return;
            }
}

/* Does `sql` start with these words (case-insensitive, any whitespace between them)? */
static int starts_with_words(const char *sql, const char *const *words)
{
    for (; *words; words++) {
        while (*sql == ' ' || *sql == '\t' || *sql == '\n' || *sql == '\r' || *sql == '(')
            sql++;
        size_t n = strlen(*words);
        if (strncasecmp(sql, *words, n) != 0)
            return 0;
        sql += n;
        if ((*sql >= 'a' && *sql <= 'z') || (*sql >= 'A' && *sql <= 'Z') || *sql == '_')
            return 0; /* a longer word */
    }
    return 1;
}

/* Statements that deallocate prepared statements empty the cache (and are not cached):
 * DEALLOCATE, and DISCARD ALL (not DISCARD TEMP and the like). */
static int cache_buster(const char *sql)
{
    static const char *const discard_all[] = {"DISCARD", "ALL", NULL};
    static const char *const deallocate[] = {"DEALLOCATE", NULL};
    return starts_with_words(sql, discard_all) || starts_with_words(sql, deallocate);
}

/* The cached statement for sql, or a new entry (*fresh set: it must be prepared first), or
 * NULL: not cached (cache off or full, or no memory). */
static stmt *cache_get(pgs_conn *c, const char *sql, int nparams, int *fresh)
{
    *fresh = 0;
    int size = c->opts.statement_cache;
    if (size < 0)
        return NULL;
    if (size == 0)
        size = DEFAULT_CACHE_SIZE;
    stmt *e;
    if (!c->cache && !(c->cache = calloc(CACHE_BUCKETS, sizeof *c->cache)))
        return NULL;
    size_t len = strlen(sql);
    uint64_t h = hash_sql(sql, len);
    for (e = c->cache[h % CACHE_BUCKETS]; e; e = e->next)
        if (e->hash == h && e->len == len && e->nparams == nparams &&
            memcmp(e->sql, sql, len) == 0) {
            c->last = e;
            c->last_sql = (uintptr_t)sql;
            return e;
        }
    if (c->cached >= size)
        return NULL;
    e = malloc(sizeof *e + len + 1);
    if (!e)
        return NULL;
    e->hash = h;
    e->len = len;
    e->nparams = nparams;
    e->no = ++c->next_stmt;
    e->parsing = 1;
    e->seg = c->segs; /* its Parse goes out now, in the open segment (emit_statement) */
    /* Unique beyond the connection: behind a pooler that shares server sessions between
     * clients, a name another client prepared can never match one of ours (it would run that
     * client's statement), and ours fails loudly instead (explain_missing_statement). */
    snprintf(e->name, sizeof e->name, "pgs_s_%016llx_%u", (unsigned long long)c->name_tag, e->no);
    memcpy(e->sql, sql, len + 1);
    e->next = c->cache[h % CACHE_BUCKETS];
    c->cache[h % CACHE_BUCKETS] = e;
    c->cached++;
    *fresh = 1;
    return e;
}

/* resolve_statement's way when the text is not the last one's (conn_private.h): the entry by
 * hash, or a new one. None when the cache is off or full; a statement that deallocates
 * prepared statements is never cached and empties the cache. */
void cache_resolve(pgs_conn *c, op *o, const char *sql, int *fresh)
{
    stmt *e = cache_get(c, sql, o->nparams, fresh);
    if (e && !*fresh && e->parsing && e->seg != c->segs)
        e = NULL; /* its Parse may yet be skipped (stmt.parsing): this one goes unnamed */
    int buster = *fresh || !e ? cache_buster(sql) : 0;
    if (*fresh && buster) { /* never cached: a hit cannot be one */
        cache_drop(c, e);
        e = NULL;
        *fresh = 0;
    }
    if (!e && buster)
        cache_clear(c); /* the server forgets (some of) our prepared statements */
    o->stmt = e;
    if (e) {
        o->stmt_no = e->no;
        o->flags |= OP_PREPARED;
    }
}
