#!/bin/sh
# CI model check of the lease protocol with the receipt rule (pure Python 3, no packages,
# about 45 s on one core). Exit status 0 iff the rule passes and every weakened rule fails.
cd "$(dirname "$0")" && exec python3 -B check.py "$@"
