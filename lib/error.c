/* pgs_error: codes, SQLSTATEs and messages with passwords redacted, and the library's version.
 * The bottom layer: knows libpq's result fields, nothing of connections or loops. */
#include "error.h"

#include <ctype.h>
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const code_names[] = {
    [PGS_OK] = "PGS_OK: success",
    [PGS_EINVAL] = "PGS_EINVAL: invalid argument",
    [PGS_EMISUSE] = "PGS_EMISUSE: call not allowed in this state",
    [PGS_ECONNECT] = "PGS_ECONNECT: could not connect to the server",
    [PGS_EAUTH] = "PGS_EAUTH: authentication failed",
    [PGS_ENODB] = "PGS_ENODB: database does not exist",
    [PGS_ECONN] = "PGS_ECONN: connection lost",
    [PGS_ESQL] = "PGS_ESQL: the server reported an error",
    [PGS_ETIMEDOUT] = "PGS_ETIMEDOUT: timed out",
    [PGS_ECANCELED] = "PGS_ECANCELED: canceled",
    [PGS_ECOMMIT_UNKNOWN] = "PGS_ECOMMIT_UNKNOWN: connection lost during COMMIT, outcome unknown",
    [PGS_ECLOSED] = "PGS_ECLOSED: the guard was closed",
    [PGS_ENOMEM] = "PGS_ENOMEM: out of memory",
    [PGS_EUNSUPPORTED] = "PGS_EUNSUPPORTED: not supported by pgscope",
    [PGS_EBUSY] = "PGS_EBUSY: too many requests waiting",
    [PGS_EAGAIN] = "PGS_EAGAIN: not now: wait until it is ready",
};

int pgs_version(const char **text)
{
    if (text)
        *text = PGSCOPE_VERSION;
    return PGSCOPE_VERSION_NUMBER;
}

const char *pgs_strerror(int code)
{
    if (code < 0 || (size_t)code >= sizeof code_names / sizeof code_names[0] ||
        !code_names[code])
        return "PGS_E?: unknown error code";
    return code_names[code];
}

/* Replace n bytes at p with "***" (always three, so the mask does not tell the length),
 * shifting the rest of the string. Returns the end of the mask. */
static char *mask_span(char *p, size_t n)
{
    memmove(p + 3, p + n, strlen(p + n) + 1);
    memcpy(p, "***", 3);
    return p + 3;
}

static void mask_secret(char *msg, const char *secret)
{
    size_t n = secret ? strlen(secret) : 0;
    if (n == 0)
        return;
    for (char *p = strstr(msg, secret); p; p = strstr(p, secret)) {
        if (n < 3) {
            /* A short password would garble the message; mask only standalone words. */
            int left = p == msg || !isalnum((unsigned char)p[-1]);
            int right = !isalnum((unsigned char)p[n]);
            if (!(left && right)) {
                p += n;
                continue;
            }
        }
        p = mask_span(p, n);
    }
}

/* "password = value" or "password='va lue'" in keyword/value form. */
static void mask_keyword_values(char *msg)
{
    for (char *p = strstr(msg, "password"); p; p = strstr(p, "password")) {
        char *q = p + 8;
        while (*q == ' ')
            q++;
        if (*q != '=') {
            p = q;
            continue;
        }
        q++;
        while (*q == ' ')
            q++;
        char *end = q;
        if (*q == '\'') {
            end++;
            while (*end && *end != '\'')
                end += (*end == '\\' && end[1]) ? 2 : 1;
            if (*end)
                end++;
        } else {
            while (*end && !isspace((unsigned char)*end) && *end != '"' && *end != '&')
                end++;
        }
        p = end > q ? mask_span(q, (size_t)(end - q)) : end;
    }
}

/* postgresql://user:secret@host */
static void mask_uri_passwords(char *msg)
{
    for (char *p = strstr(msg, "://"); p; p = strstr(p, "://")) {
        char *auth = p + 3;
        size_t len = strcspn(auth, "@/ \t\n\"'");
        if (auth[len] != '@') {
            p = auth;
            continue;
        }
        char *colon = memchr(auth, ':', len);
        p = colon && auth + len > colon + 1 ? mask_span(colon + 1, (size_t)(auth + len - colon - 1))
                                            : auth + len;
    }
}

void err_redact(char *msg, const char *secret)
{
    mask_secret(msg, secret);
    mask_keyword_values(msg);
    mask_uri_passwords(msg);
}

/* Is [p, p + n) the name of one of libpq's options? */
static int is_keyword(const PQconninfoOption *options, const char *p, size_t n)
{
    for (const PQconninfoOption *o = options; o && o->keyword; o++)
        if (strlen(o->keyword) == n && memcmp(o->keyword, p, n) == 0)
            return 1;
    return 0;
}

/* Does the quote at q open the piece of the conninfo in libpq's reason? libpq's own words
 * lead to it ("...: \"%s\"", "missing \"=\" after \"%s\"", "invalid connection option
 * \"%s\""); the quoted things before it are libpq's one-character literals ("=", "]"). */
static int opens_piece(const char *msg, const char *q)
{
    static const char *const leads[] = {": ", "after ", "option "};
    for (size_t i = 0; i < sizeof leads / sizeof *leads; i++) {
        size_t n = strlen(leads[i]);
        if ((size_t)(q - msg) >= n && memcmp(q - n, leads[i], n) == 0)
            return 1;
    }
    const char *close = strchr(q + 1, '"');
    return !close || close != q + 2 || isalnum((unsigned char)q[1]);
}

void err_conninfo_reason(char *dst, size_t size, const char *conninfo)
{
    /* libpq translates its reasons (German quotes with »...«); the C locale makes them the
     * English text read below. uselocale switches this thread only. */
    locale_t c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    char *why = NULL;
    PQconninfoOption *parsed = NULL, *options = NULL;
    if (c_locale) {
        locale_t old = uselocale(c_locale);
        parsed = PQconninfoParse(conninfo, &why);
        options = PQconninfoParse("", NULL); /* every option libpq knows, empty */
        uselocale(old);
        freelocale(c_locale);
    }
    if (!why) { /* out of memory (or it parsed, which a caller does not ask about) */
        snprintf(dst, size, "it does not parse");
    } else {
        /* The piece runs from its opening quote to the last quote of the reason: it may hold
         * quotes itself, and libpq's words after it have none. */
        const char *open = strchr(why, '"');
        while (open && !opens_piece(why, open))
            open = strchr(open + 3, '"');
        const char *last = strrchr(why, '"');
        size_t n = open && last > open ? (size_t)(last - open - 1) : 0;
        int keep = !open || (last > open && (is_keyword(options, open + 1, n) || n == 0 ||
                                             (n == 1 && !isalnum((unsigned char)open[1]))));
        if (keep)
            snprintf(dst, size, "%s", why);
        else /* an unmatched quote (a reason cut short?): nothing after it is kept */
            snprintf(dst, size, "%.*s***%s", (int)(open - why + 1), why, last > open ? last : "\"");
    }
    PQconninfoFree(parsed);
    PQconninfoFree(options);
    PQfreemem(why);
}

void err_set(pgs_error *e, pgs_code code, const char *sqlstate, const char *msg,
             const char *secret)
{
    e->code = code;
    snprintf(e->sqlstate, sizeof e->sqlstate, "%s", sqlstate ? sqlstate : "");
    /* Redact the whole text before cutting it, so a password split by the cut cannot leak. */
    size_t len = strlen(msg && *msg ? msg : pgs_strerror(code));
    /* Masking can grow the text (a 1-byte value becomes "***"): room for three times it. */
    char small[1024];
    char *buf = 3 * len + 1 < sizeof small ? small : malloc(3 * len + 1);
    if (!buf) {
        snprintf(e->message, sizeof e->message, "%s", pgs_strerror(code));
        return;
    }
    memcpy(buf, msg && *msg ? msg : pgs_strerror(code), len + 1);
    while (len > 0 && isspace((unsigned char)buf[len - 1]))
        buf[--len] = '\0';
    if (len == 0) {
        if (buf != small)
            free(buf);
        snprintf(e->message, sizeof e->message, "%s", pgs_strerror(code));
        return;
    }
    err_redact(buf, secret);
    len = strlen(buf);
    size_t n = len < sizeof e->message ? len : sizeof e->message - 1;
    memcpy(e->message, buf, n); /* cut long server messages to fit */
    e->message[n] = '\0';
    if (buf != small)
        free(buf);
}

void err_from_result(pgs_error *e, pgs_code code, const PGresult *res, const char *secret)
{
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    char msg[sizeof e->message];
    if (primary && detail)
        snprintf(msg, sizeof msg, "%s (%s)", primary, detail);
    else if (primary)
        snprintf(msg, sizeof msg, "%s", primary);
    else
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(res));
    err_set(e, code, PQresultErrorField(res, PG_DIAG_SQLSTATE), msg, secret);
}
