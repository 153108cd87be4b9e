/* Internal: building pgs_error values. The bottom layer; every other file reports through it,
 * so the redaction of passwords happens in one place. */
#ifndef PGS_ERROR_H
#define PGS_ERROR_H

#include "pgscope.h"

/* Fill e with code, sqlstate (NULL or "" for none) and msg (NULL: the code's name). The message
 * is trimmed of trailing white space, cut to fit, and every occurrence of `secret` (the
 * password, may be NULL) and anything after "password=" is replaced with "***". */
void err_set(pgs_error *e, pgs_code code, const char *sqlstate, const char *msg,
             const char *secret);

/* Fill e from a server error result: its SQLSTATE, primary message and detail. */
void err_from_result(pgs_error *e, pgs_code code, const PGresult *res, const char *secret);

/* Mask passwords in msg (in place) with "***": every copy of secret, values after "password="
 * and the password part of a postgresql://user:password@host URI. msg must have room for
 * three times its length (a one-byte value becomes three stars). */
void err_redact(char *msg, const char *secret);

/* Why `conninfo` does not parse: libpq's reason (PQconninfoParse), in English whatever the
 * locale, written to dst (size bytes, cut to fit). libpq quotes a piece of the conninfo in it
 * (a word, an option's name, a URI piece or the whole URI), which may be the password or a
 * part of it: that piece becomes "***" unless it is an option's name or one character that is
 * not a letter or digit. libpq's own quoted literals ("=", "]") stay. */
void err_conninfo_reason(char *dst, size_t size, const char *conninfo);

#endif
