# jam's cd hook for zsh. Install with this line in ~/.zshrc:
#     eval "$(jam hook zsh)"
# On every directory change (chpwd), the hook decides in pure shell (no process) whether the
# new directory lies in a jam root and has stubs to fetch; only then does it run
# `jam hook-fetch`. Every visit inside a root leaves a mark in ROOT/.jam/visits (no process).
# JAM_DISABLE=1 turns it off for this shell.

typeset -g _JAM_BIN='jam' # filled in by `jam hook zsh`
typeset -g _JAM_ROOTS_FILE="${XDG_DATA_HOME:-$HOME/.local/share}/jam/roots" # filled in by `jam hook zsh`
# The quick start (filled in when `jam hook` runs as jam itself): this interpreter with no site,
# the code that sets sys.path and answers hook-fetch; it exits 121 when it cannot, and the hook
# runs $_JAM_BIN instead.
typeset -g _JAM_PY='' # filled in by `jam hook zsh`
typeset -g _JAM_BOOT='' # filled in by `jam hook zsh`
typeset -ga _jam_roots
typeset -g _jam_roots_key=''

# zstat tells whether the roots list changed (inode, size, mtime) without reading it.
\builtin zmodload -F zsh/stat b:zstat 2>/dev/null

_jam_chpwd() {
    \builtin emulate -L zsh
    [[ $PWD != "${_JAM_PWD-}" ]] || return 0
    typeset -g _JAM_PWD=$PWD
    [[ ${JAM_DISABLE:-0} == 0 ]] || return 0
    _jam_load_roots
    local r root=''
    for r in $_jam_roots; do
        if [[ -n $r && ($PWD == "$r" || $PWD == "${r%/}"/*) ]]; then
            root=$r
            break
        fi
    done
    [[ -n $root ]] || return 0
    root=${root%/}
    # The visit counts as use (LRU): truncate ROOT/.jam/visits/<this directory, %-encoded>, a
    # builtin redirection that dates it; jam folds these marks into its catalog. Silent when
    # it cannot write (read-only root, full disk).
    # Never through a symlink: .jam and visits must be real directories, visits ours and not
    # writable by group or others (glob qualifiers: lstat, no process), the mark a regular
    # file or absent.
    local rel=${PWD#"$root"} marks=$root/.jam/visits mark
    local -a ok
    if [[ $rel != /.jam && $rel != /.jam/* && ! -L $root/.jam ]]; then
        ok=( $marks(N/U^IW) )
        if (( $#ok )) && [[ -w $marks ]]; then
            rel=${${rel:-/}//\%/%25}
            mark=$marks/${rel//\//%2F}
            if [[ ! -L $mark && ( -f $mark || ! -e $mark ) ]]; then
                { : >| $mark } 2>/dev/null
            fi
        fi
    fi
    # One stat: the mirror of $PWD in ROOT/.jam/stubdirs carries the sticky bit when a cd
    # here has stubs to fetch. A config.toml newer than the index asks jam once (hook.depth).
    local index=$root/.jam/stubdirs
    if [[ -k $index${PWD#"$root"} ]] || [[ -d $index && $root/.jam/config.toml -nt $index ]]; then
        _jam_fetch $PWD
    fi
    return 0
}

_jam_load_roots() {
    if (( $+builtins[zstat] )); then
        local -a st
        if ! zstat -A st -- $_JAM_ROOTS_FILE 2>/dev/null; then
            _jam_roots=() _jam_roots_key=''
            return 0
        fi
        local key="$st[2]:$st[8]:$st[10]"  # inode:size:mtime (jam rewrites it atomically)
        [[ $key == $_jam_roots_key ]] && return 0
        _jam_roots_key=$key
    fi
    [[ -r $_JAM_ROOTS_FILE ]] && _jam_roots=("${(@f)$(<$_JAM_ROOTS_FILE)}") || _jam_roots=()
}

_jam_fetch() {
    [[ -z ${_JAM_BROKEN-} ]] || return 0
    if [[ ! -x $_JAM_BIN ]]; then
        \builtin print -ru2 -- "jam: the cd hook cannot run $_JAM_BIN (not found); it is off in this shell"
        typeset -g _JAM_BROKEN=1
        return 0
    fi
    local rc=121
    if [[ -n $_JAM_PY && -x $_JAM_PY ]]; then
        rc=0
        $_JAM_PY -I -S -c $_JAM_BOOT hook-fetch -- $1 >&2 || rc=$?
    fi
    if (( rc == 121 )); then
        # The jam script honours $PYTHONPATH, whose empty or relative entries name the working
        # directory: run it from / so that a cd never imports code from the directory entered
        # (JAM_HOOK_CWD tells it where the shell is, for its messages).
        rc=0
        (builtin cd -q / && JAM_HOOK_CWD=$1 exec $_JAM_BIN hook-fetch -- $1) >&2 || rc=$?
    fi
    if (( rc != 0 && rc != 130 )); then
        \builtin print -ru2 -- "jam: $_JAM_BIN hook-fetch failed (exit $rc); the cd hook is off in this shell"
        typeset -g _JAM_BROKEN=1
    fi
    return 0
}

\builtin autoload -Uz add-zsh-hook
add-zsh-hook chpwd _jam_chpwd  # adds it once, however often this is sourced
_jam_chpwd  # the directory the shell starts in
