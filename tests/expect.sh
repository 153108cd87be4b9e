# expect.sh: what the script tests share (sourced): `expect NAME CONDITION...` runs the
# condition and counts it as passed or failed (naming a failure on stderr); the script ends with
# `echo "NAME: $passes passed, $fails failed"`, the line tools/run-tests counts.
fails=0
passes=0
expect() { # expect NAME CONDITION...
	local name=$1
	shift
	if "$@"; then
		passes=$((passes + 1))
	else
		echo "FAILED: $name" >&2
		fails=$((fails + 1))
	fi
}
