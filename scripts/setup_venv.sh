#!/usr/bin/env bash
# Creates .venv/ with torch==2.11.0 (the libtorch tch 0.24 links against) once, and the stable
# link .venv/libtorch -> site-packages/torch that .cargo/config.toml points LIBTORCH at.
# Idempotent: does nothing when the venv already holds the right torch.
# Usage: scripts/setup_venv.sh [extra requirement files...]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
VENV=.venv
PY="$VENV/bin/python"

have_torch() {
  [ -x "$PY" ] && "$PY" - "$TORCH_VERSION" <<'PYEOF' 2>/dev/null
import sys, importlib.metadata as m
sys.exit(0 if m.version("torch").split("+")[0] == sys.argv[1] else 1)
PYEOF
}

if ! have_torch; then
  echo "setup: creating $VENV with torch==$TORCH_VERSION (about 2.7 GB download, once)"
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --progress-bar off "torch==$TORCH_VERSION"
fi

# realpath: a .venv reached through a symlink (a git worktree sharing it) must not leak its path.
torch_dir=$("$PY" -c 'import os, importlib.util as u; print(os.path.realpath(os.path.dirname(u.find_spec("torch").origin)))')
ln -sfn "$torch_dir" "$VENV/libtorch"

for req in "$@"; do
  stamp="$VENV/.installed-$(basename "$req")-$(sha256sum "$req" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "setup: installing $req into $VENV"
    "$PY" -m pip install --progress-bar off -r "$req"
    touch "$stamp"
  fi
done
