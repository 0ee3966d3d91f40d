#!/usr/bin/env bash
# `make test-pythons`: the pure test modules (no nats-server, no engine processes) on every supported
# Python, and the schema drift test under every supported msgspec release on each of them.
#
# Each venv is built from requirements.lock (with hashes) and cached under .venvs/; it is rebuilt
# when the lock changes. A msgspec venv is the lock with only msgspec swapped for that release.
#
#   PYTHONS   interpreter versions, found under $(pyenv root)/versions/<v>/bin/python (default below)
#   MSGSPECS  msgspec releases for the schema test (default below)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHONS=${PYTHONS:-"3.11.7 3.12.1 3.13.0"}
MSGSPECS=${MSGSPECS:-"0.22.0 0.23.0"}
PURE_TESTS=(
    tests/unit/test_schemas.py
    tests/unit/test_lockfile.py
    tests/unit/test_self_contained.py
    tests/unit/test_wire.py
    tests/unit/test_machine.py
    tests/unit/test_machine_properties.py
    tests/unit/test_registry.py
    tests/unit/test_health.py
    tests/unit/test_supervision.py
    tests/unit/test_devicemasks.py
    tests/unit/test_hetero_split.py
    tests/unit/test_preflight.py
    tests/adapters/test_snapshot_for.py
    tests/unit/test_fold_restore.py
    tests/unit/test_gpu_profiles.py
    tests/unit/test_nvml_adapter.py
    tests/unit/test_public_api.py
)
LOCKFILE=requirements.lock
lock_sum=$(sha256sum "$LOCKFILE" | cut -d' ' -f1)
pyenv_root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}

find_python() {
    local v=$1 exe="$pyenv_root/versions/$1/bin/python"
    if [[ -x $exe ]]; then
        echo "$exe"
    elif command -v "python${v%.*}" >/dev/null && [[ $("python${v%.*}" -c 'import platform; print(platform.python_version())') == "$v" ]]; then
        command -v "python${v%.*}"
    else
        echo "test-pythons: Python $v not found (looked in $pyenv_root/versions/$v and python${v%.*} on PATH)" >&2
        return 1
    fi
}

# make_venv DIR PYTHON [MSGSPEC]: the lock into DIR (cached by the lock's digest), then the project.
make_venv() {
    local dir=$1 python=$2 msgspec=${3:-}
    local want="$lock_sum ${msgspec:-locked}"
    if [[ -f $dir/.installed && $(cat "$dir/.installed") == "$want" ]]; then
        return 0
    fi
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --require-hashes -r "$LOCKFILE"
    if [[ -n $msgspec ]]; then
        # msgspec has no dependencies, so swapping it leaves the rest of the lock as it is.
        "$dir/bin/python" -m pip install -q --no-deps "msgspec==$msgspec"
    fi
    "$dir/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$want" >"$dir/.installed"
}

declare -a results=()
failed=0
record() { # record LABEL STATUS
    results+=("$(printf '%-34s %s' "$1" "$2")")
    [[ $2 == ok ]] || failed=1
}

locked_msgspec=$(sed -n 's/^msgspec==\([^ ;\\]*\).*/\1/p' "$LOCKFILE")
for v in $PYTHONS; do
    python=$(find_python "$v")
    base=".venvs/py$v"
    echo "== Python $v: pure suite (${#PURE_TESTS[@]} modules), msgspec $locked_msgspec from the lock"
    make_venv "$base" "$python"
    if "$base/bin/python" -m pytest -q -p no:cacheprovider "${PURE_TESTS[@]}"; then
        record "py$v pure suite" ok
    else
        record "py$v pure suite" FAILED
    fi
    for m in $MSGSPECS; do
        dir="$base-msgspec$m"
        [[ $m == "$locked_msgspec" ]] && dir=$base # the lock's own release: the venv above is that one
        echo "== Python $v, msgspec $m: tests/unit/test_schemas.py"
        [[ $dir == "$base" ]] || make_venv "$dir" "$python" "$m"
        got=$("$dir/bin/python" -c 'import msgspec; print(msgspec.__version__)')
        if [[ $got != "$m" ]]; then
            record "py$v msgspec $m schemas" "FAILED (venv has msgspec $got)"
        elif "$dir/bin/python" -m pytest -q -p no:cacheprovider tests/unit/test_schemas.py; then
            record "py$v msgspec $m schemas" ok
        else
            record "py$v msgspec $m schemas" FAILED
        fi
    done
done

echo
echo "test-pythons summary"
printf '  %s\n' "${results[@]}"
exit $failed
