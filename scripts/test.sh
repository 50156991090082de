#!/usr/bin/env bash
# Install minisft with its test extra into .venv (CPU torch) and run the whole test suite,
# slow tests included — this is what CI runs. For the fast set alone: `.venv/bin/pytest`.
#
# Two pytest processes at once: the `long` tests (the two demo runs and the real GGUF file, minutes
# each: about half the suite's time) and all the others, slow ones included. Every test runs torch on
# one thread (tests/conftest.py's one_thread), so on a 2-core machine each process has a core and the
# suite takes about as long as the longer half, not the sum. The second half's report follows.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
bash scripts/setup_triton36.sh  # triton 3.6 for the compile check under the oldest Triton we allow

# Each half is interrupted (SIGINT: pytest then prints what passed, what failed and where it was
# stopped) after 40 minutes (MINISFT_TEST_LIMIT_S), well inside CI's 90: a test that runs away says
# which one it is instead of the whole job vanishing at the CI limit; one that does not stop is killed
# a minute later. --foreground keeps both halves in this script's process group, so a Ctrl-C (or a
# CI job being cancelled) reaches them. On 2 cores the longer half took 20 minutes (README, Tests).
limit=${MINISFT_TEST_LIMIT_S:-2400}
pytest_half=(timeout --foreground --signal=INT --kill-after=60 "$limit" python -m pytest)
rest_log=$(mktemp)
"${pytest_half[@]}" -m "not long" "$@" >"$rest_log" 2>&1 &
rest_pid=$!  # timeout's: it passes a TERM on to its pytest
trap 'kill "$rest_pid" 2>/dev/null || true; rm -f "$rest_log"' EXIT
demos=0
"${pytest_half[@]}" -m long "$@" || demos=$?
rest=0
wait "$rest_pid" || rest=$?
echo "---------------- all the other tests (run beside the demo runs above)"
cat "$rest_log"
for half in "long:$demos" "other:$rest"; do
    case ${half#*:} in
    124) echo "error: the ${half%:*} tests ran past $limit s and were interrupted (their report is above)" ;;
    137) echo "error: the ${half%:*} tests ran past $limit s and did not stop when interrupted: killed, no report" ;;
    esac
done
# 5 is "no tests collected": arguments that select tests of one kind only leave the other half empty.
if [ "$demos" -eq 5 ] && [ "$rest" -eq 5 ]; then exit 5; fi
[ "$demos" -eq 5 ] && demos=0
[ "$rest" -eq 5 ] && rest=0
exit $((demos > rest ? demos : rest))
