#!/bin/sh
# Extract the C example between the readme-example markers of README.md, so the test suite
# compiles and runs exactly what the README shows.
set -eu
awk '/<!-- readme-example:begin -->/ {on = 1; next}
     /<!-- readme-example:end -->/ {on = 0}
     on && !/^```/' "$1" > "$2"
[ -s "$2" ] || { echo "readme-example.sh: no example found in $1" >&2; exit 1; }
