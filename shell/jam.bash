# shellcheck shell=bash
# jam's cd hook for bash. Install with this line in ~/.bashrc:
#     eval "$(jam hook bash)"
# When $PWD changes, the hook decides in pure shell (no process) whether the new directory
# lies in a jam root and has stubs to fetch; only then does it run `jam hook-fetch`. Every
# visit inside a root leaves a mark in ROOT/.jam/visits (no process). JAM_DISABLE=1 turns it
# off for this shell.

_JAM_BIN='jam' # filled in by `jam hook bash`
_JAM_ROOTS_FILE="${XDG_DATA_HOME:-$HOME/.local/share}/jam/roots" # filled in by `jam hook bash`
# The quick start (filled in when `jam hook` runs as jam itself): this interpreter with no site,
# the code that sets sys.path and answers hook-fetch; it exits 121 when it cannot, and the hook
# runs $_JAM_BIN instead.
_JAM_PY='' # filled in by `jam hook bash`
_JAM_BOOT='' # filled in by `jam hook bash`

_jam_hook() {
    local _jam_status=$?
    if [[ $PWD != "${_JAM_PWD-}" ]]; then
        _JAM_PWD=$PWD
        if [[ ${JAM_DISABLE:-0} == 0 ]]; then
            _jam_visit
        fi
    fi
    return "$_jam_status"
}

_jam_visit() {
    local _jam_root='' _jam_r _jam_roots=()
    # The roots list is a few short lines: reading it is one read(2), cheaper than a stat
    # would be to decide whether to read it (bash has no builtin to get an mtime).
    [[ -r $_JAM_ROOTS_FILE ]] || return 0
    \builtin mapfile -t _jam_roots <"$_JAM_ROOTS_FILE" 2>/dev/null || return 0
    for _jam_r in "${_jam_roots[@]}"; do
        if [[ -n $_jam_r && ($PWD == "$_jam_r" || $PWD == "${_jam_r%/}"/*) ]]; then
            _jam_root=$_jam_r
            break
        fi
    done
    [[ -n $_jam_root ]] || return 0
    _jam_root=${_jam_root%/}
    # The visit counts as use (LRU): truncate ROOT/.jam/visits/<this directory, %-encoded>, a
    # builtin redirection that dates it; jam folds these marks into its catalog. Silent when
    # it cannot write (read-only root, full disk). Never through a symlink: .jam and visits
    # must be real directories, visits ours (jam makes it 0700 and refuses one that others
    # can write into; bash has no builtin to read a mode), the mark a regular file or absent.
    local _jam_rel=${PWD#"$_jam_root"} _jam_marks=$_jam_root/.jam/visits _jam_mark
    if [[ $_jam_rel != /.jam && $_jam_rel != /.jam/* && ! -L $_jam_root/.jam && ! -L $_jam_marks &&
        -d $_jam_marks && -O $_jam_marks && -w $_jam_marks ]]; then
        _jam_rel=${_jam_rel:-/}
        _jam_rel=${_jam_rel//%/%25}
        _jam_mark=$_jam_marks/${_jam_rel//\//%2F}
        if [[ ! -L $_jam_mark && (-f $_jam_mark || ! -e $_jam_mark) ]]; then
            { : >|"$_jam_mark"; } 2>/dev/null || : # a mark that cannot be made fails nothing (set -e)
        fi
    fi
    # One stat: the mirror of $PWD in ROOT/.jam/stubdirs carries the sticky bit when a cd
    # here has stubs to fetch. A config.toml newer than the index asks jam once (hook.depth).
    local _jam_index=$_jam_root/.jam/stubdirs
    if [[ -k $_jam_index${PWD#"$_jam_root"} ]] ||
        [[ -d $_jam_index && $_jam_root/.jam/config.toml -nt $_jam_index ]]; then
        _jam_fetch "$PWD"
    fi
}

_jam_fetch() {
    if [[ -n ${_JAM_BROKEN-} ]]; then
        return 0
    fi
    if [[ ! -x $_JAM_BIN ]]; then
        \builtin printf 'jam: the cd hook cannot run %s (not found); it is off in this shell\n' "$_JAM_BIN" >&2
        _JAM_BROKEN=1
        return 0
    fi
    local _jam_rc=121
    if [[ -n $_JAM_PY && -x $_JAM_PY ]]; then
        _jam_rc=0
        "$_JAM_PY" -I -S -c "$_JAM_BOOT" hook-fetch -- "$1" >&2 || _jam_rc=$?
    fi
    if ((_jam_rc == 121)); then
        # The jam script honours $PYTHONPATH, whose empty or relative entries name the working
        # directory: run it from / so that a cd never imports code from the directory entered
        # (JAM_HOOK_CWD tells it where the shell is, for its messages).
        _jam_rc=0
        (builtin cd / && JAM_HOOK_CWD=$1 exec "$_JAM_BIN" hook-fetch -- "$1") >&2 || _jam_rc=$?
    fi
    if ((_jam_rc != 0 && _jam_rc != 130)); then
        \builtin printf 'jam: %s hook-fetch failed (exit %s); the cd hook is off in this shell\n' \
            "$_JAM_BIN" "$_jam_rc" >&2
        _JAM_BROKEN=1
    fi
    return 0
}

# Install once: PROMPT_COMMAND in array form (bash >= 5.1) or string form, first in line so
# it sees the user's $? and hands it on unchanged. `&& :`: the hook's non-zero status (the
# user's) is then that of a command in an && list, which neither `set -e` nor an ERR trap
# acts on (they did on the user's command already).
_jam_install() {
    local _jam_c
    for _jam_c in "${PROMPT_COMMAND[@]}"; do
        [[ ";$_jam_c;" == *";_jam_hook;"* || ";$_jam_c;" == *";_jam_hook && :;"* ]] && return 0
    done
    if [[ -n ${PROMPT_COMMAND+set} && ${PROMPT_COMMAND@a} == *a* ]]; then
        PROMPT_COMMAND=("_jam_hook && :" "${PROMPT_COMMAND[@]}")
    else
        # shellcheck disable=SC2128,SC2178
        PROMPT_COMMAND="_jam_hook && :${PROMPT_COMMAND:+;$PROMPT_COMMAND}"
    fi
}
_jam_install
\builtin unset -f _jam_install
