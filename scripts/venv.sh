# Sourced by scripts/test and scripts/serve: use the active Python environment when it runs this checkout's
# langadapt (CI's venv, a developer's own), otherwise this checkout's .venv, created by scripts/setup on first use.
uses_this_checkout() {
  python3 - <<'PY' 2>/dev/null
import os, sys
import langadapt.core, pytest, torch  # noqa: F401  (the suite's own needs)
sys.exit(0 if os.path.samefile(list(langadapt.core.__path__)[0], "core") else 1)
PY
}
if ! uses_this_checkout; then
  [ -x .venv/bin/langadapt ] && [ -x .venv/bin/pytest ] || scripts/setup
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
