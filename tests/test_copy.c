/* Bulk data against the real server: COPY FROM STDIN (rows, NULLs and every byte value, bad
 * data, constraint violations, the caller's abort, cancel, loss, transactions, backpressure),
 * COPY TO STDOUT, and results streamed row by row, with what each promises about its callbacks:
 * done exactly once and last, data callbacks never after it, the connection usable afterwards
 * where the header says so. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"

/* ---- one transfer: its callbacks, counted ---- */

typedef struct xfer {
    /* done */
    th_call done;
    int res_null;
    ExecStatusType status;
    char cmdtuples[32];
    char context[512];      /* PG_DIAG_CONTEXT of done's res */
    char res_message[512];  /* PQresultErrorMessage of done's res */
    int probe_in_done;      /* call write/end on the handle from inside done */
    int write_in_done_rc, end_in_done_rc;
    /* COPY FROM STDIN: the data to send, in pieces of `chunk` bytes */
    pgs_copy *copy;
    const char *buf;
    size_t len, off, chunk;
    size_t stop_at;          /* > 0: stop writing once off reaches it, and do not end */
    const char *abort_reason; /* passed to pgs_copy_end */
    int hold;                /* on_ready only counts; the test writes */
    int ended, end_rc;
    int ready;               /* on_ready calls */
    int ready_after_end;
    int eagain;              /* writes refused with PGS_EAGAIN */
    int writes;              /* writes taken */
    /* COPY TO STDOUT and streamed rows */
    int data;                /* on_data / on_rows calls */
    int data_after_done;
    int stop_after;          /* > 0: return non-zero from the stop_after'th call */
    long rows;               /* rows seen */
    long next;               /* the next value expected in the first column (in order) */
    int out_of_order;
    int max_batch;
    int bad_batch;           /* a call with PQntuples < 1 */
    size_t bytes;
    int first_seq, last_seq; /* th_fire_seq at the first and last data call */
} xfer;

static void on_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    xfer *x = arg;
    th_record(c, res, err, &x->done);
    x->res_null = res == NULL;
    if (res) {
        x->status = PQresultStatus(res);
        snprintf(x->cmdtuples, sizeof x->cmdtuples, "%s", PQcmdTuples((PGresult *)res));
        const char *ctx = PQresultErrorField(res, PG_DIAG_CONTEXT);
        snprintf(x->context, sizeof x->context, "%s", ctx ? ctx : "");
        snprintf(x->res_message, sizeof x->res_message, "%s", PQresultErrorMessage(res));
    }
    if (x->probe_in_done && x->copy) {
        x->write_in_done_rc = pgs_copy_write(x->copy, "9\tz\n", 4);
        x->end_in_done_rc = pgs_copy_end(x->copy, NULL);
    }
}

/* Write what is left until it is all taken (then end) or the copy says PGS_EAGAIN. */
static void pump(xfer *x)
{
    while (x->off < x->len) {
        if (x->stop_at && x->off >= x->stop_at)
            return;
        size_t n = x->len - x->off < x->chunk ? x->len - x->off : x->chunk;
        int rc = pgs_copy_write(x->copy, x->buf + x->off, n);
        if (rc == PGS_EAGAIN) {
            x->eagain++;
            return;
        }
        ck_assert_msg(rc == PGS_OK, "pgs_copy_write: %s", pgs_strerror(rc));
        x->off += n;
        x->writes++;
    }
    if (x->stop_at || x->ended)
        return;
    x->ended = 1;
    x->end_rc = pgs_copy_end(x->copy, x->abort_reason);
    ck_assert_int_eq(x->end_rc, PGS_OK);
}

static void on_ready(pgs_copy *copy, void *arg)
{
    xfer *x = arg;
    x->ready++;
    if (x->ended)
        x->ready_after_end++;
    if (x->done.fired)
        x->data_after_done++;
    ck_assert_ptr_nonnull(copy);
    if (x->copy)
        ck_assert_ptr_eq(copy, x->copy); /* the handle pgs_copy_in returned */
    x->copy = copy;
    if (!x->hold)
        pump(x);
}

/* COPY TO STDOUT: each call one text row "<int>\t...\n". */
static int on_data(pgs_conn *c, const char *data, size_t len, void *arg)
{
    (void)c;
    xfer *x = arg;
    x->data++;
    if (x->done.fired)
        x->data_after_done++;
    if (x->data == 1)
        x->first_seq = th_fire_seq++;
    x->last_seq = th_fire_seq++;
    ck_assert_uint_gt(len, 0);
    x->bytes += len;
    x->rows++;
    char first[32];
    size_t i = 0;
    while (i < len && i < sizeof first - 1 && data[i] != '\t' && data[i] != '\n') {
        first[i] = data[i];
        i++;
    }
    first[i] = '\0';
    if (data[len - 1] != '\n' || atol(first) != x->next)
        x->out_of_order++;
    x->next++;
    return x->stop_after && x->data >= x->stop_after;
}

/* Streamed rows: the first column counts up from x->next. */
static int on_rows(pgs_conn *c, const PGresult *rows, void *arg)
{
    (void)c;
    xfer *x = arg;
    x->data++;
    if (x->done.fired)
        x->data_after_done++;
    if (x->data == 1)
        x->first_seq = th_fire_seq++;
    x->last_seq = th_fire_seq++;
    int n = PQntuples(rows);
    if (n < 1)
        x->bad_batch++;
    if (n > x->max_batch)
        x->max_batch = n;
    for (int r = 0; r < n; r++) {
        if (atol(PQgetvalue(rows, r, 0)) != x->next)
            x->out_of_order++;
        x->next++;
        x->rows++;
    }
    return x->stop_after && x->data >= x->stop_after;
}

/* The data for COPY ... FROM STDIN: rows "i\t<v>\n" for i in [from, to], v = "v<i>". */
static char *rows_text(long from, long to, size_t *len)
{
    size_t cap = (size_t)(to - from + 1) * 32 + 1, n = 0;
    char *s = malloc(cap);
    ck_assert_ptr_nonnull(s);
    for (long i = from; i <= to; i++)
        n += (size_t)snprintf(s + n, cap - n, "%ld\tv%ld\n", i, i);
    *len = n;
    return s;
}

static void start_copy_in(pgs_conn *c, const char *sql, xfer *x)
{
    pgs_copy *out = NULL;
    ck_assert_int_eq(pgs_copy_in(c, sql, on_ready, on_done, x, &out), PGS_OK);
    ck_assert_ptr_nonnull(out);
    x->copy = out;
    ck_assert_int_eq(x->ready + x->done.fired, 0); /* never from inside the call */
}

/* A statement on the same guard after the transfer: the connection is usable. */
static void assert_usable(struct event_base *b, pgs_conn *c)
{
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 'still here'", 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_OK);
    ck_assert_str_eq(k.value, "still here");
}

/* ---- COPY FROM STDIN ---- */

START_TEST(test_copy_in_of_no_rows_lands_nothing_and_reports_zero)
{
    th_fresh_table("copy_none");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.buf = "", .len = 0, .chunk = 1};
    /* out may be NULL: on_ready hands over the handle */
    ck_assert_int_eq(pgs_copy_in(c, "COPY copy_none FROM STDIN", on_ready, on_done, &x, NULL),
                     PGS_OK);
    ck_assert_int_eq(x.ready + x.done.fired, 0);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.ready, 1);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_int_eq(x.status, PGRES_COMMAND_OK);
    ck_assert_str_eq(x.cmdtuples, "0");
    ck_assert_int_eq(th_rows("copy_none"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
    ck_assert_int_eq(x.ready_after_end, 0);
}
END_TEST

START_TEST(test_copy_in_of_one_row_lands_it_and_the_handle_is_done_after)
{
    th_fresh_table("copy_one");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.buf = "7\tseven\n", .len = 8, .chunk = 64, .probe_in_done = 1};
    start_copy_in(c, "COPY copy_one (id, v) FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "1");
    ck_assert_int_eq(x.end_rc, PGS_OK);
    /* once done has fired, the handle takes nothing more */
    ck_assert_int_eq(x.write_in_done_rc, PGS_EMISUSE);
    ck_assert_int_eq(x.end_in_done_rc, PGS_EMISUSE);
    ck_assert_int_eq(th_rows("copy_one"), 1);
    char *v = th_scalar("SELECT v FROM copy_one WHERE id = 7", 0, NULL);
    ck_assert_str_eq(v, "seven");
    free(v);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_in_of_many_rows_lands_every_row)
{
    enum { N = 200000 };
    th_fresh_table("copy_many");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    size_t len;
    char *data = rows_text(1, N, &len);
    /* 8000-byte pieces: rows span writes */
    xfer x = {.buf = data, .len = len, .chunk = 8000};
    start_copy_in(c, "COPY copy_many FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 30);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_str_eq(x.cmdtuples, "200000");
    ck_assert_uint_eq(x.off, len);
    ck_assert_int_eq(th_rows("copy_many"), N);
    ck_assert_int_eq(th_scalar_long("SELECT sum(id) FROM copy_many", 0, NULL),
                     (long)N * (N + 1) / 2);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM copy_many WHERE v = 'v' || id", 0, NULL),
                     N);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
    ck_assert_int_eq(x.ready_after_end, 0);
}
END_TEST

/* COPY's text format: backslash, newline, carriage return and tab are escaped; every other
 * byte goes as it is. */
static size_t copy_escape(char *dst, const unsigned char *src, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        switch (src[i]) {
        case '\\': dst[o++] = '\\'; dst[o++] = '\\'; break;
        case '\n': dst[o++] = '\\'; dst[o++] = 'n'; break;
        case '\r': dst[o++] = '\\'; dst[o++] = 'r'; break;
        case '\t': dst[o++] = '\\'; dst[o++] = 't'; break;
        default: dst[o++] = (char)src[i];
        }
    }
    return o;
}

static void hex(char *dst, const unsigned char *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        sprintf(dst + 2 * i, "%02x", src[i]);
    dst[2 * n] = '\0';
}

START_TEST(test_copy_in_keeps_null_empty_and_every_byte_value)
{
    free(th_scalar("DROP TABLE IF EXISTS copy_bytes", 0, NULL));
    free(th_scalar("CREATE TABLE copy_bytes (id int PRIMARY KEY, t text, b bytea)", 0, NULL));
    /* the text: every code point 1..255 (UTF-8, the database's encoding); the bytea: every
     * byte value 1..255 */
    unsigned char utf8[512], raw[255];
    size_t ulen = 0;
    for (int cp = 1; cp <= 255; cp++) {
        raw[cp - 1] = (unsigned char)cp;
        if (cp < 0x80) {
            utf8[ulen++] = (unsigned char)cp;
        } else {
            utf8[ulen++] = (unsigned char)(0xC0 | (cp >> 6));
            utf8[ulen++] = (unsigned char)(0x80 | (cp & 0x3F));
        }
    }
    ck_assert_uint_eq(ulen, 383);
    char rawhex[511], utf8hex[767], utf8z[384];
    hex(rawhex, raw, sizeof raw);
    hex(utf8hex, utf8, ulen);
    memcpy(utf8z, utf8, ulen);
    utf8z[ulen] = '\0';

    char data[4096];
    size_t n = 0;
    n += (size_t)sprintf(data + n, "1\t");
    n += copy_escape(data + n, utf8, ulen);
    n += (size_t)sprintf(data + n, "\t\\\\x%s\n", rawhex); /* \\x...: bytea hex, escaped once */
    n += (size_t)sprintf(data + n, "2\t\\N\t\\N\n");    /* NULL, NULL */
    n += (size_t)sprintf(data + n, "3\t\t\n");            /* '', '' (not NULL) */
    ck_assert_uint_lt(n, sizeof data);

    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.buf = data, .len = n, .chunk = 1}; /* a byte per write: escapes split too */
    start_copy_in(c, "COPY copy_bytes FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 20);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_str_eq(x.cmdtuples, "3");
    th_close(b, c);
    th_loop_end(b);

    /* byte for byte, as the server holds them */
    char *v = th_scalar("SELECT encode(convert_to(t, 'UTF8'), 'hex') FROM copy_bytes WHERE id = 1",
                        0, NULL);
    ck_assert_str_eq(v, utf8hex);
    free(v);
    const char *p[] = {utf8z};
    v = th_scalar("SELECT (t = $1)::text || length(t) FROM copy_bytes WHERE id = 1", 1, p);
    ck_assert_str_eq(v, "true255");
    free(v);
    v = th_scalar("SELECT encode(b, 'hex') FROM copy_bytes WHERE id = 1", 0, NULL);
    ck_assert_str_eq(v, rawhex);
    free(v);
    const char *h[] = {rawhex};
    v = th_scalar("SELECT (b = decode($1, 'hex'))::text || length(b) FROM copy_bytes WHERE id = 1",
                  1, h);
    ck_assert_str_eq(v, "true255");
    free(v);
    v = th_scalar("SELECT (t IS NULL AND b IS NULL)::text FROM copy_bytes WHERE id = 2", 0, NULL);
    ck_assert_str_eq(v, "true");
    free(v);
    v = th_scalar("SELECT (t = '' AND b = ''::bytea)::text FROM copy_bytes WHERE id = 3", 0, NULL);
    ck_assert_str_eq(v, "true");
    free(v);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_in_bad_data_fails_with_22P02_naming_its_line)
{
    th_fresh_table("copy_bad");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *data = "1\ta\n2\tb\n3\tc\nnot-a-number\td\n5\te\n";
    xfer x = {.buf = data, .len = strlen(data), .chunk = 5}; /* every write still taken */
    start_copy_in(c, "COPY copy_bad FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.end_rc, PGS_OK);
    ck_assert_int_eq(x.done.code, PGS_ESQL);
    ck_assert_str_eq(x.done.sqlstate, "22P02");
    ck_assert_int_eq(x.res_null, 0);
    ck_assert_msg(strstr(x.context, "line 4") != NULL, "context: %s", x.context);
    ck_assert_int_eq(th_rows("copy_bad"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_in_unique_violation_found_at_the_end_keeps_no_rows)
{
    th_fresh_table("copy_dup");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    size_t l1, l2;
    char *a = rows_text(1, 3000, &l1), *d = rows_text(1500, 1500, &l2);
    char *data = malloc(l1 + l2);
    memcpy(data, a, l1);
    memcpy(data + l1, d, l2); /* the last row repeats id 1500 */
    xfer x = {.buf = data, .len = l1 + l2, .chunk = 4096};
    start_copy_in(c, "COPY copy_dup FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_ESQL);
    ck_assert_str_eq(x.done.sqlstate, "23505");
    ck_assert_int_eq(x.res_null, 0);
    ck_assert_int_eq(th_rows("copy_dup"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    free(a);
    free(d);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
}
END_TEST

START_TEST(test_copy_in_aborted_by_the_caller_keeps_no_rows)
{
    th_fresh_table("copy_abort");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    size_t len;
    char *data = rows_text(1, 1000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096, .abort_reason = "changed my mind"};
    start_copy_in(c, "COPY copy_abort FROM STDIN", &x);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.end_rc, PGS_OK);
    ck_assert_int_eq(x.done.code, PGS_ECANCELED);
    ck_assert_str_eq(x.done.sqlstate, "57014");
    ck_assert_int_eq(x.res_null, 0); /* the server's result */
    ck_assert_msg(strstr(x.done.message, "changed my mind") != NULL, "message: %s",
                  x.done.message);
    ck_assert_msg(strstr(x.res_message, "changed my mind") != NULL, "res: %s", x.res_message);
    ck_assert_int_eq(th_rows("copy_abort"), 0);
    assert_usable(b, c); /* an abort is the protocol's own end: the session goes on */
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.ready_after_end, 0);
}
END_TEST

START_TEST(test_copy_end_before_the_copy_starts_is_applied_when_it_starts)
{
    th_fresh_table("copy_early_end");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    /* ends before on_ready: with nothing written, 0 rows */
    xfer x = {.hold = 1};
    start_copy_in(c, "COPY copy_early_end FROM STDIN", &x);
    ck_assert_int_eq(pgs_copy_end(x.copy, NULL), PGS_OK);
    ck_assert_int_eq(pgs_copy_end(x.copy, NULL), PGS_EMISUSE); /* already ended */
    ck_assert_int_eq(pgs_copy_write(x.copy, "1\ta\n", 4), PGS_EMISUSE);
    x.ended = 1;
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "0");
    /* an abort before on_ready */
    xfer y = {.hold = 1};
    start_copy_in(c, "COPY copy_early_end FROM STDIN", &y);
    ck_assert_int_eq(pgs_copy_end(y.copy, "never mind"), PGS_OK);
    y.ended = 1;
    th_run_until(b, &y.done.fired, 10);
    ck_assert_int_eq(y.done.code, PGS_ECANCELED);
    ck_assert_int_eq(th_rows("copy_early_end"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(y.done.fired, 1);
    ck_assert_int_eq(x.data_after_done + y.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_in_cancelled_mid_copy_keeps_no_rows_and_ends_the_backend)
{
    th_fresh_table("copy_cancel");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    size_t len;
    char *data = rows_text(1, 20000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096, .stop_at = len / 2}; /* then waits */
    th_call queued = {0};
    start_copy_in(c, "COPY copy_cancel FROM STDIN", &x);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &queued), PGS_OK);
    th_run_until(b, &x.ready, 10);
    th_run_for(b, 0.1);
    ck_assert_int_eq(x.done.fired, 0);
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_OK);
    th_run_until(b, &queued.fired, 10);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.done.code, PGS_ECANCELED);
    ck_assert_int_lt(x.done.seq, queued.seq);
    ck_assert_int_eq(queued.code, PGS_ECANCELED);
    th_wait_backend_gone(pid, 5);
    ck_assert_int_eq(th_rows("copy_cancel"), 0);
    th_call later_q = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &later_q), PGS_ECANCELED);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
    ck_assert_int_eq(later_q.fired, 0);
}
END_TEST

START_TEST(test_copy_in_backend_terminated_mid_copy_is_econn)
{
    th_fresh_table("copy_killed");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    size_t len;
    char *data = rows_text(1, 20000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096, .stop_at = len / 2}; /* then waits */
    start_copy_in(c, "COPY copy_killed FROM STDIN", &x);
    th_run_until(b, &x.ready, 10);
    th_run_for(b, 0.1);
    th_terminate(pid);
    /* the caller writes nothing more: the loss alone ends the COPY */
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_ECONN);
    ck_assert_int_eq(x.res_null, 1);
    ck_assert_int_eq(th_rows("copy_killed"), 0);
    th_call after_q = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after_q), PGS_ECONN);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
    /* the server sent its FATAL before closing: its reason, as for any statement */
    ck_assert_str_eq(x.done.sqlstate, "57P01");
}
END_TEST

typedef struct closed {
    xfer *x;
    int done;
    int copy_done_then;
} closed;

static void on_closed(void *arg)
{
    closed *cl = arg;
    cl->done++;
    cl->copy_done_then = cl->x->done.fired;
}

START_TEST(test_close_during_copy_in_reports_eclosed_and_keeps_no_rows)
{
    th_fresh_table("copy_closed");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    size_t len;
    char *data = rows_text(1, 1000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096, .stop_at = len / 2};
    start_copy_in(c, "COPY copy_closed FROM STDIN", &x);
    th_run_until(b, &x.ready, 10);
    closed cl = {.x = &x};
    ck_assert_int_eq(pgs_conn_close(c, on_closed, &cl), PGS_OK);
    ck_assert_int_eq(x.done.fired, 0); /* never from inside the call */
    th_run_until(b, &cl.done, 10);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.done.code, PGS_ECLOSED);
    ck_assert_int_eq(cl.copy_done_then, 1); /* the COPY's done came before the guard's */
    th_loop_end(b);
    th_wait_backend_gone(pid, 5);
    ck_assert_int_eq(th_rows("copy_closed"), 0);
    free(data);
    ck_assert_int_eq(cl.done, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

/* ---- COPY FROM STDIN inside a transaction guard ---- */

static long seen_outside = -1;

static void on_done_count_outside(pgs_conn *c, const PGresult *res, const pgs_error *err,
                                  void *arg)
{
    on_done(c, res, err, arg);
    seen_outside = th_rows("copy_tx_commit"); /* another session, before COMMIT */
}

START_TEST(test_copy_in_inside_a_committed_transaction_lands_rows_at_commit)
{
    th_fresh_table("copy_tx_commit");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    size_t len;
    char *data = rows_text(1, 1000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096};
    pgs_tx *tx;
    th_call before = {0}, count = {0};
    th_txdone d = {0};
    pgs_copy *cp = NULL;
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO copy_tx_commit VALUES (0, 'zero')", 0, NULL,
                                  th_record, &before),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_tx_commit FROM STDIN", on_ready,
                                    on_done_count_outside, &x, &cp),
                     PGS_OK);
    ck_assert_ptr_nonnull(cp);
    x.copy = cp;
    /* queued after the COPY: runs after it, in the same transaction */
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT count(*) FROM copy_tx_commit", 0, NULL, th_record,
                                  &count),
                     PGS_OK);
    th_run_until(b, &count.fired, 10);
    ck_assert_int_eq(before.code, PGS_OK);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_str_eq(x.cmdtuples, "1000");
    ck_assert_int_lt(before.seq, x.done.seq);
    ck_assert_int_lt(x.done.seq, count.seq);
    ck_assert_int_eq(seen_outside, 0);
    ck_assert_str_eq(count.value, "1001");
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d.has_err, 0);
    ck_assert_int_eq(th_rows("copy_tx_commit"), 1001);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_copy_in_inside_a_rolled_back_transaction_leaves_no_rows)
{
    th_fresh_table("copy_tx_rb");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    size_t len;
    char *data = rows_text(1, 1000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096};
    pgs_tx *tx;
    th_txdone d = {0};
    pgs_copy *cp = NULL;
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_tx_rb FROM STDIN", on_ready, on_done, &x, &cp),
                     PGS_OK);
    x.copy = cp;
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "1000");
    ck_assert_int_eq(pgs_tx_end(tx, 0, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 0); /* the rollback asked for */
    ck_assert_int_eq(th_rows("copy_tx_rb"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_transaction_timeout_mid_copy_rolls_back_and_closes)
{
    /* The COPY has started and the caller stalls (writes some rows, never ends): the
     * transaction's time limit cancels it like pgs_tx_cancel. */
    th_fresh_table("copy_tx_timeout");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    size_t len;
    char *data = rows_text(1, 5000, &len);
    xfer x = {.buf = data, .len = len, .chunk = 4096, .stop_at = 8192};
    pgs_tx *tx;
    th_txdone d = {0};
    pgs_tx_opts o = {.timeout_ms = 400};
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_tx_timeout FROM STDIN", on_ready, on_done, &x,
                                    &x.copy),
                     PGS_OK);
    double t0 = th_now();
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_ETIMEDOUT);
    ck_assert_msg(x.done.at - t0 >= 0.35 && x.done.at - t0 < 3.0, "done after %.3f s",
                  x.done.at - t0);
    ck_assert_int_ge(x.writes, 1); /* it was under way */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.err.code, PGS_ETIMEDOUT);
    th_wait_backend_gone(pid, 5); /* the connection was closed, its state unknown */
    ck_assert_int_eq(th_rows("copy_tx_timeout"), 0);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_failing_copy_in_a_transaction_rolls_it_back_with_that_error)
{
    th_fresh_table("copy_tx_bad");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *data = "1\ta\n2\tb\nthree\tc\n";
    xfer x = {.buf = data, .len = strlen(data), .chunk = 64};
    pgs_tx *tx;
    th_call before = {0}, behind = {0};
    th_txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO copy_tx_bad VALUES (0, 'zero')", 0, NULL,
                                  th_record, &before),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_tx_bad FROM STDIN", on_ready, on_done, &x,
                                    NULL),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO copy_tx_bad VALUES (9, 'nine')", 0, NULL,
                                  th_record, &behind),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK); /* asks to commit: cannot */
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(before.code, PGS_OK);
    ck_assert_int_eq(x.done.code, PGS_ESQL);
    ck_assert_str_eq(x.done.sqlstate, "22P02");
    ck_assert_msg(strstr(x.context, "line 3") != NULL, "context: %s", x.context);
    ck_assert_int_eq(behind.code, PGS_ESQL);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 1);
    ck_assert_int_eq(d.err.code, PGS_ESQL);
    ck_assert_str_eq(d.err.sqlstate, "22P02");
    ck_assert_int_lt(x.done.seq, behind.seq);
    ck_assert_int_eq(th_rows("copy_tx_bad"), 0);
    ck_assert_int_eq(pgs_conn_txstatus(c), PQTRANS_IDLE);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired + before.fired + behind.fired + d.fired, 4);
    ck_assert_int_eq(x.data_after_done, 0);
    /* queued after the failure: the error that aborted it (as after a failed pgs_tx_query) */
    ck_assert_str_eq(behind.sqlstate, "22P02");
}
END_TEST

/* ---- backpressure ---- */

START_TEST(test_copy_in_write_before_the_copy_starts_is_eagain_and_after_end_misuse)
{
    th_fresh_table("copy_wait");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    /* another session holds the table: the server cannot start the COPY */
    PGconn *blocker = th_lock_table("copy_wait", "ACCESS EXCLUSIVE");
    xfer x = {.hold = 1};
    start_copy_in(c, "COPY copy_wait FROM STDIN", &x);
    ck_assert_int_eq(pgs_copy_write(x.copy, "1\ta\n", 4), PGS_EAGAIN);
    th_run_for(b, 0.3);
    ck_assert_int_eq(x.ready, 0);
    ck_assert_int_eq(x.done.fired, 0);
    ck_assert_int_eq(pgs_copy_write(x.copy, "1\ta\n", 4), PGS_EAGAIN); /* still not started */
    th_unlock(blocker);
    th_run_until(b, &x.ready, 10);
    ck_assert_int_eq(x.done.fired, 0);
    ck_assert_int_eq(pgs_copy_write(x.copy, "1\ta\n2\t", 6), PGS_OK);
    ck_assert_int_eq(pgs_copy_write(x.copy, "b\n", 2), PGS_OK);
    ck_assert_int_eq(pgs_copy_end(x.copy, NULL), PGS_OK);
    x.ended = 1;
    ck_assert_int_eq(pgs_copy_write(x.copy, "3\tc\n", 4), PGS_EMISUSE);
    ck_assert_int_eq(pgs_copy_end(x.copy, NULL), PGS_EMISUSE);
    ck_assert_int_eq(pgs_copy_end(x.copy, "too late"), PGS_EMISUSE);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "2");
    ck_assert_int_eq(th_rows("copy_wait"), 2);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.ready, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_in_of_much_data_stops_at_eagain_and_resumes_from_on_ready)
{
    enum { ROWS = 24000, WIDTH = 1000 };
    th_fresh_table("copy_bp");
    free(th_scalar("DROP TABLE IF EXISTS copy_gate", 0, NULL));
    free(th_scalar("CREATE TABLE copy_gate (x int)", 0, NULL));
    /* the first row waits for a lock another session holds: the server stops reading */
    free(th_scalar("CREATE OR REPLACE FUNCTION copy_gate_wait() RETURNS trigger LANGUAGE plpgsql "
                   "AS $$ BEGIN LOCK TABLE copy_gate IN ACCESS SHARE MODE; RETURN NEW; END $$",
                   0, NULL));
    free(th_scalar("CREATE TRIGGER gate BEFORE INSERT ON copy_bp FOR EACH ROW WHEN (NEW.id = 1) "
                   "EXECUTE FUNCTION copy_gate_wait()",
                   0, NULL));
    size_t cap = (size_t)ROWS * (WIDTH + 16), len = 0;
    char *data = malloc(cap);
    for (int i = 1; i <= ROWS; i++) {
        len += (size_t)sprintf(data + len, "%d\t", i);
        memset(data + len, 'a' + i % 26, WIDTH);
        len += WIDTH;
        data[len++] = '\n';
    }
    ck_assert_uint_gt(len, 24000000);

    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    PGconn *blocker = th_lock_table("copy_gate", "ACCESS EXCLUSIVE");
    xfer x = {.buf = data, .len = len, .chunk = 65536};
    start_copy_in(c, "COPY copy_bp FROM STDIN", &x);
    th_run_until(b, &x.eagain, 10);
    /* held back: the rest waits for on_ready, which waits for the server */
    size_t taken = x.off;
    int ready = x.ready;
    ck_assert_uint_lt(taken, len / 2);
    th_run_for(b, 0.3);
    ck_assert_int_eq(x.ready, ready);
    ck_assert_uint_eq(x.off, taken);
    ck_assert_int_eq(x.done.fired, 0);
    th_unlock(blocker);
    th_run_until(b, &x.done.fired, 30);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_uint_eq(x.off, len);
    ck_assert_int_ge(x.eagain, 1);
    ck_assert_int_gt(x.ready, ready); /* resumed from on_ready */
    char want[32];
    snprintf(want, sizeof want, "%d", ROWS);
    ck_assert_str_eq(x.cmdtuples, want);
    ck_assert_int_eq(th_rows("copy_bp"), ROWS);
    ck_assert_int_eq(th_scalar_long("SELECT sum(length(v)) FROM copy_bp", 0, NULL),
                     (long)ROWS * WIDTH);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM copy_bp WHERE v = repeat(chr(97 + id % "
                                    "26), 1000)",
                                    0, NULL),
                     ROWS);
    th_close(b, c);
    th_loop_end(b);
    free(data);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
    ck_assert_int_eq(x.ready_after_end, 0);
}
END_TEST

/* ---- misuse ---- */

static int must_not_data(pgs_conn *c, const char *data, size_t len, void *arg)
{
    (void)c;
    (void)data;
    (void)len;
    (*(int *)arg)++;
    return 0;
}

static int must_not_rows(pgs_conn *c, const PGresult *rows, void *arg)
{
    (void)c;
    (void)rows;
    (*(int *)arg)++;
    return 0;
}

static void must_not_ready(pgs_copy *copy, void *arg)
{
    (void)copy;
    (*(int *)arg)++;
}

static void probe_bad_writes(pgs_copy *copy, void *arg)
{
    xfer *x = arg;
    x->ready++;
    char buf[8] = "1\ta\n";
    ck_assert_int_eq(pgs_copy_write(copy, NULL, 4), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_write(copy, buf, (size_t)INT_MAX + 1), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_write(copy, buf, 4), PGS_OK); /* still usable */
    ck_assert_int_eq(pgs_copy_end(copy, NULL), PGS_OK);
}

START_TEST(test_bad_arguments_are_refused_at_once_without_a_callback)
{
    th_fresh_table("copy_args");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k = {0}; /* every refused call's callbacks count into k.fired */
    pgs_copy *cp = NULL;
    const char *in = "COPY copy_args FROM STDIN", *out = "COPY copy_args TO STDOUT";
    ck_assert_int_eq(pgs_copy_in(NULL, in, must_not_ready, th_record, &k, &cp), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_in(c, NULL, must_not_ready, th_record, &k, &cp), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_in(c, in, NULL, th_record, &k, &cp), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_in(c, in, must_not_ready, NULL, &k, &cp), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_copy_in(NULL, in, must_not_ready, th_record, &k, &cp), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_write(NULL, "x", 1), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_end(NULL, NULL), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_out(NULL, out, must_not_data, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_out(c, NULL, must_not_data, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_out(c, out, NULL, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_copy_out(c, out, must_not_data, NULL, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_copy_out(NULL, out, must_not_data, th_record, &k), PGS_EINVAL);
    const char *one[] = {"1"};
    ck_assert_int_eq(pgs_query_stream(NULL, "SELECT 1", 0, NULL, 0, must_not_rows, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, NULL, 0, NULL, 0, must_not_rows, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1", 0, NULL, -1, must_not_rows, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1", 0, NULL, 0, NULL, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1", 0, NULL, 0, must_not_rows, NULL, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT $1", -1, one, 0, must_not_rows, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT $1", 1, NULL, 0, must_not_rows, th_record, &k),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_query_stream(NULL, "SELECT 1", 0, NULL, 0, must_not_rows, th_record,
                                         &k),
                     PGS_EINVAL);
    /* bad writes on a live COPY are refused and take nothing */
    xfer x = {0};
    ck_assert_int_eq(pgs_copy_in(c, in, probe_bad_writes, on_done, &x, NULL), PGS_OK);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.ready, 1);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "1");
    /* a closing guard takes nothing new */
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(pgs_copy_in(c, in, must_not_ready, th_record, &k, &cp), PGS_EMISUSE);
    ck_assert_int_eq(pgs_copy_out(c, out, must_not_data, th_record, &k), PGS_EMISUSE);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1", 0, NULL, 0, must_not_rows, th_record, &k),
                     PGS_EMISUSE);
    th_loop_end(b);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(k.fired, 0);
    ck_assert_int_eq(th_rows("copy_args"), 1);
}
END_TEST

START_TEST(test_copy_in_of_a_statement_that_is_not_copy_from_stdin_is_einval)
{
    th_fresh_table("copy_notin");
    free(th_scalar("INSERT INTO copy_notin SELECT g, 'r' || g FROM generate_series(1, 5000) g", 0,
                   NULL));
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer sel = {.hold = 1}, out = {.hold = 1};
    th_call next = {0};
    ck_assert_int_eq(pgs_copy_in(c, "SELECT 1", on_ready, on_done, &sel, NULL), PGS_OK);
    /* COPY TO STDOUT: read to its end and discarded */
    ck_assert_int_eq(pgs_copy_in(c, "COPY copy_notin TO STDOUT", on_ready, on_done, &out, NULL),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'next'", 0, NULL, th_record, &next), PGS_OK);
    th_run_until(b, &next.fired, 10);
    ck_assert_int_eq(sel.done.fired, 1);
    ck_assert_int_eq(sel.done.code, PGS_EINVAL);
    ck_assert_int_eq(out.done.fired, 1);
    ck_assert_int_eq(out.done.code, PGS_EINVAL);
    ck_assert_int_eq(sel.ready + out.ready, 0);
    ck_assert_int_eq(next.code, PGS_OK);
    ck_assert_str_eq(next.value, "next"); /* its own result, not the COPY's leftovers */
    ck_assert_int_eq(next.ntuples, 1);
    ck_assert_int_lt(sel.done.seq, out.done.seq);
    ck_assert_int_lt(out.done.seq, next.seq);
    ck_assert_int_eq(th_rows("copy_notin"), 5000);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(sel.done.fired + out.done.fired, 2);
}
END_TEST

START_TEST(test_copy_out_of_a_statement_that_is_not_copy_to_stdout_is_einval_copying_nothing)
{
    th_fresh_table("copy_notout");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer in = {.next = 1}, sel = {.next = 1};
    ck_assert_int_eq(pgs_copy_out(c, "COPY copy_notout FROM STDIN", on_data, on_done, &in),
                     PGS_OK);
    ck_assert_int_eq(pgs_copy_out(c, "SELECT 1", on_data, on_done, &sel), PGS_OK);
    th_run_until(b, &sel.done.fired, 10);
    ck_assert_int_eq(in.done.fired, 1);
    ck_assert_int_eq(in.done.code, PGS_EINVAL);
    ck_assert_int_eq(sel.done.code, PGS_EINVAL);
    ck_assert_int_eq(in.data + sel.data, 0);
    ck_assert_int_eq(th_rows("copy_notout"), 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(in.done.fired + sel.done.fired, 2);
}
END_TEST

START_TEST(test_bulk_calls_on_a_guard_owned_by_a_transaction_are_misuse)
{
    th_fresh_table("copy_owned");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    th_call k = {0};
    th_txdone dsp = {0}, d = {0};
    pgs_copy *cp = NULL;
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_copy_in(c, "COPY copy_owned FROM STDIN", must_not_ready, th_record, &k,
                                 &cp),
                     PGS_EMISUSE);
    ck_assert_int_eq(
        pgs_copy_out(c, "COPY copy_owned TO STDOUT", must_not_data, th_record, &k), PGS_EMISUSE);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1", 0, NULL, 0, must_not_rows, th_record, &k),
                     PGS_EMISUSE);
    /* the parent with an open child: LIFO */
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_owned FROM STDIN", must_not_ready, th_record,
                                    &k, &cp),
                     PGS_EMISUSE);
    ck_assert_int_eq(
        pgs_tx_copy_out(tx, "COPY copy_owned TO STDOUT", must_not_data, th_record, &k),
        PGS_EMISUSE);
    ck_assert_int_eq(
        pgs_tx_query_stream(tx, "SELECT 1", 0, NULL, 0, must_not_rows, th_record, &k),
        PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &dsp), PGS_OK);
    /* an ending transaction */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_in(tx, "COPY copy_owned FROM STDIN", must_not_ready, th_record,
                                    &k, &cp),
                     PGS_EMISUSE);
    ck_assert_int_eq(
        pgs_tx_copy_out(tx, "COPY copy_owned TO STDOUT", must_not_data, th_record, &k),
        PGS_EMISUSE);
    ck_assert_int_eq(
        pgs_tx_query_stream(tx, "SELECT 1", 0, NULL, 0, must_not_rows, th_record, &k),
        PGS_EMISUSE);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(dsp.outcome, PGS_TX_COMMITTED);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(k.fired, 0);
}
END_TEST

/* ---- COPY TO STDOUT ---- */

START_TEST(test_copy_out_of_no_rows_delivers_nothing)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_copy_out(c, "COPY (SELECT 1 WHERE false) TO STDOUT", on_data, on_done,
                                  &x),
                     PGS_OK);
    ck_assert_int_eq(x.done.fired, 0);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_int_eq(x.status, PGRES_COMMAND_OK);
    ck_assert_str_eq(x.cmdtuples, "0");
    ck_assert_int_eq(x.data, 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
}
END_TEST

START_TEST(test_copy_out_of_many_rows_delivers_each_row_once_in_order)
{
    enum { N = 100000 };
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_copy_out(c,
                                  "COPY (SELECT i, md5(i::text) FROM generate_series(1, 100000) i "
                                  "ORDER BY i) TO STDOUT",
                                  on_data, on_done, &x),
                     PGS_OK);
    th_run_until(b, &x.done.fired, 30);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_str_eq(x.cmdtuples, "100000");
    ck_assert_int_eq(x.rows, N);
    ck_assert_int_eq(x.data, N); /* text format: one row per call */
    ck_assert_int_eq(x.out_of_order, 0);
    size_t want = 0;
    for (long i = 1; i <= N; i++) {
        char s[24];
        want += (size_t)snprintf(s, sizeof s, "%ld", i) + 1 + 32 + 1;
    }
    ck_assert_uint_eq(x.bytes, want);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_out_stopped_early_delivers_no_more_and_the_connection_stays_usable)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1, .stop_after = 10};
    th_call next = {0};
    ck_assert_int_eq(pgs_copy_out(c, "COPY (SELECT i FROM generate_series(1, 20000) i) TO STDOUT",
                                  on_data, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'next'", 0, NULL, th_record, &next), PGS_OK);
    th_run_until(b, &next.fired, 30);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_int_eq(x.data, 10);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_int_lt(x.done.seq, next.seq);
    ck_assert_int_eq(next.code, PGS_OK);
    ck_assert_str_eq(next.value, "next");
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data, 10);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_out_backend_terminated_mid_copy_is_econn)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    xfer x = {.next = 1};
    /* 2000 rows (well over the server's 8 KiB send buffer) come, then the server sleeps */
    ck_assert_int_eq(pgs_copy_out(c,
                                  "COPY (SELECT i, repeat('x', 100), CASE WHEN i = 2001 THEN "
                                  "pg_sleep(30)::text END FROM generate_series(1, 2001) i) "
                                  "TO STDOUT",
                                  on_data, on_done, &x),
                     PGS_OK);
    th_run_until(b, &x.data, 10);
    th_run_for(b, 0.2);
    ck_assert_int_eq(x.done.fired, 0);
    th_terminate(pid);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_ECONN);
    ck_assert_str_eq(x.done.sqlstate, "57P01");
    ck_assert_int_ge(x.rows, 1);
    ck_assert_int_le(x.rows, 2000);
    ck_assert_int_eq(x.out_of_order, 0);
    th_call after_q = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after_q), PGS_ECONN);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_copy_out_inside_a_transaction_sees_its_uncommitted_rows)
{
    th_fresh_table("copy_tx_out");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call ins = {0};
    th_txdone d = {0};
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx,
                                  "INSERT INTO copy_tx_out SELECT g, 'v' || g FROM "
                                  "generate_series(1, 500) g",
                                  0, NULL, th_record, &ins),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_copy_out(tx, "COPY (SELECT * FROM copy_tx_out ORDER BY id) TO STDOUT",
                                     on_data, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 0, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(ins.code, PGS_OK);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_str_eq(x.cmdtuples, "500");
    ck_assert_int_eq(x.rows, 500);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_int_lt(ins.seq, x.first_seq);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 0);
    ck_assert_int_eq(th_rows("copy_tx_out"), 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

/* ---- streamed results ---- */

START_TEST(test_stream_of_no_rows_calls_on_rows_never)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 1 WHERE false", 0, NULL, 0, on_rows, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(x.done.fired, 0);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_int_eq(x.status, PGRES_TUPLES_OK);
    ck_assert_int_eq(x.done.ntuples, 0);
    ck_assert_str_eq(x.cmdtuples, "0");
    ck_assert_int_eq(x.data, 0);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
}
END_TEST

typedef struct one_row {
    xfer x;
    char value[64];
    int nfields;
    char fname[64];
} one_row;

static int on_one_row(pgs_conn *c, const PGresult *rows, void *arg)
{
    one_row *o = arg;
    o->nfields = PQnfields(rows);
    snprintf(o->fname, sizeof o->fname, "%s", PQfname(rows, 0));
    snprintf(o->value, sizeof o->value, "%s", PQgetvalue(rows, 0, 0));
    o->x.next = atol(PQgetvalue(rows, 0, 0)); /* (on_rows checks the first column counts up) */
    return on_rows(c, rows, &o->x);
}

START_TEST(test_stream_of_one_row_delivers_it_once)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    one_row o;
    memset(&o, 0, sizeof o);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT 42 AS answer, 'x' AS other", 0, NULL, 0,
                                      on_one_row, on_done, &o.x),
                     PGS_OK);
    th_run_until(b, &o.x.done.fired, 10);
    ck_assert_int_eq(o.x.done.code, PGS_OK);
    ck_assert_int_eq(o.x.data, 1);
    ck_assert_int_eq(o.x.rows, 1);
    ck_assert_str_eq(o.value, "42");
    ck_assert_int_eq(o.nfields, 2);
    ck_assert_str_eq(o.fname, "answer");
    ck_assert_int_eq(o.x.status, PGRES_TUPLES_OK);
    ck_assert_int_eq(o.x.done.ntuples, 0); /* the final result holds no rows */
    ck_assert_str_eq(o.x.cmdtuples, "1");
    ck_assert_int_lt(o.x.last_seq, o.x.done.seq);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(o.x.done.fired, 1);
    ck_assert_int_eq(o.x.data_after_done, 0);
}
END_TEST

START_TEST(test_stream_of_many_rows_delivers_each_row_once_in_order)
{
    enum { N = 300000 };
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_query_stream(c, "SELECT i FROM generate_series(1, 300000) i", 0, NULL, 0,
                                      on_rows, on_done, &x),
                     PGS_OK);
    th_run_until(b, &x.done.fired, 30);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_int_eq(x.rows, N);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_int_eq(x.bad_batch, 0);
    ck_assert_int_le(x.max_batch, 256); /* the default batch */
    ck_assert_str_eq(x.cmdtuples, "300000");
    ck_assert_int_eq(x.done.ntuples, 0);
    ck_assert_int_lt(x.last_seq, x.done.seq);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

typedef struct param_rows {
    th_call done;
    int calls;
    char got[3][2][64];
    int isnull[3][2];
    int nrows;
} param_rows;

static void on_param_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    th_record(c, res, err, &((param_rows *)arg)->done);
}

static int on_param_rows(pgs_conn *c, const PGresult *rows, void *arg)
{
    (void)c;
    param_rows *p = arg;
    ck_assert_int_eq(p->done.fired, 0);
    p->calls++;
    for (int r = 0; r < PQntuples(rows); r++, p->nrows++) {
        ck_assert_int_lt(p->nrows, 3);
        for (int f = 0; f < 2; f++) {
            snprintf(p->got[p->nrows][f], 64, "%s", PQgetvalue(rows, r, f));
            p->isnull[p->nrows][f] = PQgetisnull(rows, r, f);
        }
    }
    return 0;
}

START_TEST(test_stream_parameters_travel_as_values)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    param_rows p;
    memset(&p, 0, sizeof p);
    const char *v[] = {"'; DROP TABLE x; --", "40", NULL};
    ck_assert_int_eq(pgs_query_stream(c,
                                      "SELECT $1::text || g, CASE WHEN g = 3 THEN $3::int ELSE "
                                      "$2::int + g END FROM generate_series(1, 3) g",
                                      3, v, 1, on_param_rows, on_param_done, &p),
                     PGS_OK);
    th_run_until(b, &p.done.fired, 10);
    ck_assert_int_eq(p.done.code, PGS_OK);
    ck_assert_int_eq(p.nrows, 3);
    ck_assert_int_eq(p.calls, 3); /* batch_rows 1: a row per call */
    ck_assert_str_eq(p.got[0][0], "'; DROP TABLE x; --1");
    ck_assert_str_eq(p.got[1][0], "'; DROP TABLE x; --2");
    ck_assert_str_eq(p.got[0][1], "41");
    ck_assert_str_eq(p.got[1][1], "42");
    ck_assert_int_eq(p.isnull[2][1], 1); /* NULL parameter: SQL NULL */
    ck_assert_int_eq(p.isnull[2][0], 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(p.done.fired, 1);
}
END_TEST

START_TEST(test_stream_stopped_early_delivers_no_more_and_the_next_statement_gets_its_own_result)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1, .stop_after = 100};
    th_call next = {0};
    ck_assert_int_eq(pgs_query_stream(c, "SELECT i FROM generate_series(1, 20000) i", 0, NULL, 1,
                                      on_rows, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'next'", 0, NULL, th_record, &next), PGS_OK);
    th_run_until(b, &next.fired, 30);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_msg(x.done.code == PGS_OK, "done: %s", x.done.message);
    ck_assert_int_eq(x.data, 100);
    ck_assert_int_eq(x.rows, 100);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_str_eq(x.cmdtuples, "20000"); /* the statement's end: all there were */
    ck_assert_int_lt(x.done.seq, next.seq);
    ck_assert_int_eq(next.code, PGS_OK);
    ck_assert_str_eq(next.value, "next");
    ck_assert_int_eq(next.ntuples, 1);
    /* and another stream after it runs whole */
    xfer y = {.next = 1};
    ck_assert_int_eq(pgs_query_stream(c, "SELECT i FROM generate_series(1, 10) i", 0, NULL, 0,
                                      on_rows, on_done, &y),
                     PGS_OK);
    th_run_until(b, &y.done.fired, 10);
    ck_assert_int_eq(y.done.code, PGS_OK);
    ck_assert_int_eq(y.rows, 10);
    ck_assert_int_eq(y.out_of_order, 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.data, 100);
    ck_assert_int_eq(x.data_after_done + y.data_after_done, 0);
    ck_assert_int_eq(x.done.fired + y.done.fired, 2);
}
END_TEST

START_TEST(test_stream_error_after_some_rows_comes_after_those_rows)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    xfer x = {.next = 1};
    /* row 1000 divides by zero */
    ck_assert_int_eq(pgs_query_stream(c, "SELECT i, 1 / (1000 - i) FROM generate_series(1, 2000) i",
                                      0, NULL, 0, on_rows, on_done, &x),
                     PGS_OK);
    th_run_until(b, &x.done.fired, 10);
    ck_assert_int_eq(x.done.code, PGS_ESQL);
    ck_assert_str_eq(x.done.sqlstate, "22012");
    ck_assert_int_eq(x.res_null, 0);
    ck_assert_int_eq(x.rows, 999);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_int_lt(x.last_seq, x.done.seq);
    assert_usable(b, c);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_stream_backend_terminated_mid_stream_is_econn)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    xfer x = {.next = 1};
    th_call queued = {0};
    ck_assert_int_eq(pgs_query_stream(c,
                                      "SELECT i, repeat('x', 100), CASE WHEN i = 2001 THEN "
                                      "pg_sleep(30)::text END FROM generate_series(1, 2001) i",
                                      0, NULL, 0, on_rows, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &queued), PGS_OK);
    th_run_until(b, &x.data, 10);
    th_run_for(b, 0.2);
    ck_assert_int_eq(x.done.fired, 0);
    th_terminate(pid);
    th_run_until(b, &queued.fired, 10);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.done.code, PGS_ECONN);
    ck_assert_str_eq(x.done.sqlstate, "57P01");
    ck_assert_int_ge(x.rows, 1);
    ck_assert_int_le(x.rows, 2000);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_int_eq(queued.code, PGS_ECONN);
    ck_assert_int_lt(x.done.seq, queued.seq);
    th_call after_q = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after_q), PGS_ECONN);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_stream_inside_a_transaction_then_a_query_then_commit)
{
    th_fresh_table("stream_tx");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call ins = {0}, count = {0};
    th_txdone d = {0};
    xfer x = {.next = 1};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx,
                                  "INSERT INTO stream_tx SELECT g, 'v' || g FROM "
                                  "generate_series(1, 500) g",
                                  0, NULL, th_record, &ins),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query_stream(tx, "SELECT id FROM stream_tx ORDER BY id", 0, NULL, 0,
                                         on_rows, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT count(*) FROM stream_tx", 0, NULL, th_record,
                                  &count),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(ins.code, PGS_OK);
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_int_eq(x.rows, 500); /* sees the transaction's own rows */
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_str_eq(x.cmdtuples, "500");
    ck_assert_int_eq(count.code, PGS_OK);
    ck_assert_str_eq(count.value, "500");
    ck_assert_int_lt(ins.seq, x.first_seq);
    ck_assert_int_lt(x.done.seq, count.seq);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d.has_err, 0);
    ck_assert_int_eq(th_rows("stream_tx"), 500);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(x.done.fired, 1);
    ck_assert_int_eq(x.data_after_done, 0);
}
END_TEST

START_TEST(test_statements_queued_around_a_stream_run_in_order_with_their_own_results)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call a = {0}, bb = {0}, cc = {0}, err = {0}, e = {0};
    xfer x = {.next = 1};
    /* one loop turn: pipelined statements, a stream, more statements */
    ck_assert_int_eq(pgs_query(c, "SELECT 'a'", 0, NULL, th_record, &a), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'b'", 0, NULL, th_record, &bb), PGS_OK);
    ck_assert_int_eq(pgs_query_stream(c, "SELECT i FROM generate_series(1, 1000) i", 0, NULL, 0,
                                      on_rows, on_done, &x),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'c'", 0, NULL, th_record, &cc), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1 / 0", 0, NULL, th_record, &err), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 'e'", 0, NULL, th_record, &e), PGS_OK);
    th_run_until(b, &e.fired, 10);
    ck_assert_str_eq(a.value, "a");
    ck_assert_str_eq(bb.value, "b");
    ck_assert_int_eq(x.done.code, PGS_OK);
    ck_assert_int_eq(x.rows, 1000);
    ck_assert_int_eq(x.out_of_order, 0);
    ck_assert_str_eq(cc.value, "c");
    ck_assert_int_eq(cc.ntuples, 1);
    ck_assert_str_eq(err.sqlstate, "22012");
    ck_assert_int_eq(e.code, PGS_OK); /* an error does not affect the next */
    ck_assert_str_eq(e.value, "e");
    ck_assert_int_lt(a.seq, bb.seq);
    ck_assert_int_lt(bb.seq, x.first_seq);
    ck_assert_int_lt(x.last_seq, x.done.seq);
    ck_assert_int_lt(x.done.seq, cc.seq);
    ck_assert_int_lt(cc.seq, err.seq);
    ck_assert_int_lt(err.seq, e.seq);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(a.fired + bb.fired + x.done.fired + cc.fired + err.fired + e.fired, 6);
}
END_TEST

static Suite *copy_suite(void)
{
    Suite *s = suite_create("copy");
    TCase *t = tcase_create("copy");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_copy_in_of_no_rows_lands_nothing_and_reports_zero);
    tcase_add_test(t, test_copy_in_of_one_row_lands_it_and_the_handle_is_done_after);
    tcase_add_test(t, test_copy_in_of_many_rows_lands_every_row);
    tcase_add_test(t, test_copy_in_keeps_null_empty_and_every_byte_value);
    tcase_add_test(t, test_copy_in_bad_data_fails_with_22P02_naming_its_line);
    tcase_add_test(t, test_copy_in_unique_violation_found_at_the_end_keeps_no_rows);
    tcase_add_test(t, test_copy_in_aborted_by_the_caller_keeps_no_rows);
    tcase_add_test(t, test_copy_end_before_the_copy_starts_is_applied_when_it_starts);
    tcase_add_test(t, test_copy_in_cancelled_mid_copy_keeps_no_rows_and_ends_the_backend);
    tcase_add_test(t, test_copy_in_backend_terminated_mid_copy_is_econn);
    tcase_add_test(t, test_close_during_copy_in_reports_eclosed_and_keeps_no_rows);
    tcase_add_test(t, test_copy_in_inside_a_committed_transaction_lands_rows_at_commit);
    tcase_add_test(t, test_copy_in_inside_a_rolled_back_transaction_leaves_no_rows);
    tcase_add_test(t, test_transaction_timeout_mid_copy_rolls_back_and_closes);
    tcase_add_test(t, test_failing_copy_in_a_transaction_rolls_it_back_with_that_error);
    tcase_add_test(t, test_copy_in_write_before_the_copy_starts_is_eagain_and_after_end_misuse);
    tcase_add_test(t, test_copy_in_of_much_data_stops_at_eagain_and_resumes_from_on_ready);
    tcase_add_test(t, test_bad_arguments_are_refused_at_once_without_a_callback);
    tcase_add_test(t, test_copy_in_of_a_statement_that_is_not_copy_from_stdin_is_einval);
    tcase_add_test(t,
                   test_copy_out_of_a_statement_that_is_not_copy_to_stdout_is_einval_copying_nothing);
    tcase_add_test(t, test_bulk_calls_on_a_guard_owned_by_a_transaction_are_misuse);
    tcase_add_test(t, test_copy_out_of_no_rows_delivers_nothing);
    tcase_add_test(t, test_copy_out_of_many_rows_delivers_each_row_once_in_order);
    tcase_add_test(t, test_copy_out_stopped_early_delivers_no_more_and_the_connection_stays_usable);
    tcase_add_test(t, test_copy_out_backend_terminated_mid_copy_is_econn);
    tcase_add_test(t, test_copy_out_inside_a_transaction_sees_its_uncommitted_rows);
    tcase_add_test(t, test_stream_of_no_rows_calls_on_rows_never);
    tcase_add_test(t, test_stream_of_one_row_delivers_it_once);
    tcase_add_test(t, test_stream_of_many_rows_delivers_each_row_once_in_order);
    tcase_add_test(t, test_stream_parameters_travel_as_values);
    tcase_add_test(
        t, test_stream_stopped_early_delivers_no_more_and_the_next_statement_gets_its_own_result);
    tcase_add_test(t, test_stream_error_after_some_rows_comes_after_those_rows);
    tcase_add_test(t, test_stream_backend_terminated_mid_stream_is_econn);
    tcase_add_test(t, test_stream_inside_a_transaction_then_a_query_then_commit);
    tcase_add_test(t, test_statements_queued_around_a_stream_run_in_order_with_their_own_results);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(copy_suite());
}
