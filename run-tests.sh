#!/usr/bin/env bash
# Run the whole test suite: installs what is missing (see scripts/ensure-env.sh), then pytest.
# Extra arguments go to pytest, e.g. ./run-tests.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure-env.sh
.venv/bin/ruff check proxy tests bench
.venv/bin/mypy      # proxy/, settings in pyproject.toml [tool.mypy]
exec .venv/bin/python -m pytest "${@:-tests}"
