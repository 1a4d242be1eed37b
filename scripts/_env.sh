# Sourced by scripts/demo and scripts/test: makes .venv and installs what the
# project needs into it, once.  Never replaces a torch that is already there.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
stamp="$venv/.installed-$(cat "$root/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    # torch: keep any torch the venv already has; otherwise the pinned
    # 2.13.0 (a local CPU wheel on our machines; an unpinned torch would
    # pull gigabytes of CUDA packages).
    if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
        "$vpy" -m pip install -q "torch==2.13.0"
    fi
    "$vpy" -m pip install -q -e "$root[test]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
