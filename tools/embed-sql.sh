#!/bin/sh
# embed-sql.sh IN.sql OUT.h NAME: the SQL file as a C string constant, so the demo carries its
# schema and needs no path to it at run time.
set -eu
{
    echo "/* generated from $(basename "$1") by embed-sql.sh */"
    echo "static const char $3[] ="
    sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/^/    "/' -e 's/$/\\n"/' "$1"
    echo "    ;"
} > "$2"
