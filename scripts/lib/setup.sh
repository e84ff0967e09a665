# Shared set-up for scripts/demo, scripts/test and scripts/bench: Debian packages and the virtual
# environment. Sourced, not run. Idempotent: only installs what is missing.

SCONIFY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$SCONIFY_ROOT/.venv"
PY="$VENV/bin/python"

_apt_updated=0
need_debs() {
    # need_debs PKG... : install the Debian packages that are not installed yet.
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "sconify: these Debian packages are missing: ${missing[*]}; install them as root (apt-get install ${missing[*]})." >&2
        return 1
    fi
    echo "sconify: installing Debian packages: ${missing[*]}" >&2
    if [ $_apt_updated = 0 ]; then apt-get update -qq >&2; _apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

ensure_venv() {
    # ensure_venv EXTRAS : the project's virtual environment with sconify installed (editable).
    local extras="${1:-}"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then need_debs python3-venv; fi
    if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
    local stamp="$VENV/.sconify-installed$extras"
    if [ ! -f "$stamp" ] || [ "$SCONIFY_ROOT/setup.cfg" -nt "$stamp" ]; then
        echo "sconify: installing sconify and its Python packages into $VENV" >&2
        local log="$VENV/pip-install.log" target="$SCONIFY_ROOT"
        [ -n "$extras" ] && target="$SCONIFY_ROOT[$extras]"
        if ! { "$PY" -m pip install -q --disable-pip-version-check --upgrade pip &&
               "$PY" -m pip install -q --disable-pip-version-check -e "$target"; } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            echo "sconify: pip install failed; the whole log is in $log" >&2
            return 1
        fi
        touch "$stamp"
    fi
}
