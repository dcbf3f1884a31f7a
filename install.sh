#!/usr/bin/env bash
# Creates .venv with the pinned requirements (idempotent: a second run only checks).
#
#   ./install.sh              requirements.txt under constraints.txt: every package at
#                             the version the test suite passed with
#   ./install.sh --unlocked   requirements.txt alone (newest compatible dependencies),
#                             to refresh constraints.txt (see docs/build.md)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CONSTRAINTS=(-c constraints.txt)
case "${1:-}" in
    "") ;;
    --unlocked) CONSTRAINTS=() ;;
    *) echo "usage: $0 [--unlocked]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "${CONSTRAINTS[@]}"
.venv/bin/python -m pip install -q -r requirements.txt "${CONSTRAINTS[@]}"
.venv/bin/python -m pip install -q --no-deps -e .
