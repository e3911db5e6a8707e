#!/usr/bin/env bash
# The test command: lint, pyright (strict on src/), mypy, then pytest (which also runs the
# typing tests under tests/typing that assert both checkers reject miswired specs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check src tests benchmarks examples
echo "== pyright"; pyright
echo "== mypy"; mypy
echo "== pytest"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing, failing CI" >&2
  exit 1
fi
exit "$rc"
