# jam's cd hook for fish (>= 3.5). Install with this line in ~/.config/fish/config.fish:
#     jam hook fish | source
# When $PWD changes, the hook decides in pure shell (no process) whether the new directory
# lies in a jam root and has stubs to fetch; only then does it run `jam hook-fetch`. Every
# visit inside a root leaves a mark in ROOT/.jam/visits (no process). JAM_DISABLE=1 turns it
# off for this shell.

set -g _jam_bin 'jam' # filled in by `jam hook fish`
# The quick start (filled in when `jam hook` runs as jam itself): this interpreter with no site,
# the code that sets sys.path and answers hook-fetch; it exits 121 when it cannot, and the hook
# runs $_jam_bin instead.
set -g _jam_py '' # filled in by `jam hook fish`
set -g _jam_boot '' # filled in by `jam hook fish`
set -g _jam_roots_file (string join / -- (set -q XDG_DATA_HOME[1]; and echo $XDG_DATA_HOME; or echo ~/.local/share) jam roots) # filled in by `jam hook fish`
set -q _jam_roots_key; or set -g _jam_roots_key ''
set -q _jam_roots; or set -g _jam_roots

function _jam_on_pwd --on-variable PWD --description 'jam: fetch the stubs of the new directory'
    test "$PWD" = "$_jam_pwd"; and return 0
    set -g _jam_pwd $PWD
    test "$JAM_DISABLE" = '' -o "$JAM_DISABLE" = 0; or return 0
    _jam_load_roots
    set -l root
    for r in $_jam_roots
        test -n "$r"; or continue
        set -l prefix (string trim -r -c / -- $r)/
        if test "$PWD" = "$r"; or test (string sub -l (string length -- $prefix) -- $PWD | string collect) = "$prefix"
            set root $r
            break
        end
    end
    test -n "$root"; or return 0
    set root (string trim -r -c / -- $root)
    # The path from the root with a '/' after it (`/` for the root itself, `/d/` below it):
    # `string collect` trims one trailing newline, then that of the output, never the name's.
    set -l rest (string sub -s (math (string length -- $root) + 1) -- "$PWD/" | string collect)
    # The visit counts as use (LRU): truncate ROOT/.jam/visits/<this directory, %-encoded>, a
    # builtin redirection that dates it; jam folds these marks into its catalog. fish warns
    # when a redirection fails, whatever stderr is, so what can be checked first is.
    set -l marks $root/.jam/visits
    switch "$rest"
        case /.jam/ '/.jam/*'
        case '*'
            # Never through a symlink: .jam and visits must be real directories, visits ours
            # (jam makes it 0700 and refuses one that others can write into; fish has no
            # builtin to read a mode), the mark a regular file or absent.
            if test -d $marks -a -O $marks -a -w $marks; and not test -L $marks; and not test -L $root/.jam
                string escape --style=url -- $rest | string replace -r -- '(?<=.)/$' '' | string replace -a / %2F | read -l name
                set -l mark $marks/$name
                if not string match -qr -- '^.{256}' $name
                    if not test -L $mark; and begin
                            test -f $mark -a -w $mark; or not test -e $mark
                        end
                        true >$mark
                    end
                end
            end
    end
    # One stat: the mirror of $PWD in ROOT/.jam/stubdirs carries the sticky bit when a cd
    # here has stubs to fetch. A config.toml newer than the index asks jam once (hook.depth).
    set -l index $root/.jam/stubdirs
    if test -k "$index$rest"; or begin
            test -d $index; and test $root/.jam/config.toml -nt $index
        end
        _jam_fetch $PWD
    end
    return 0
end

function _jam_load_roots
    # path mtime has one-second resolution: a list read in the second it was written is
    # read again next time.
    set -l m (path mtime -- $_jam_roots_file 2>/dev/null)
    or begin
        set -g _jam_roots
        set -g _jam_roots_key ''
        return 0
    end
    test "$m" = "$_jam_roots_key"; and return 0
    set -l age (path mtime --relative -- $_jam_roots_file 2>/dev/null)
    set -g _jam_roots (string match -v -- '' <$_jam_roots_file)
    if test "$age" -ge 2 2>/dev/null
        set -g _jam_roots_key $m
    else
        set -g _jam_roots_key ''
    end
end

function _jam_fetch
    set -q _jam_broken; and return 0
    if not test -x "$_jam_bin"
        printf 'jam: the cd hook cannot run %s (not found); it is off in this shell\n' $_jam_bin >&2
        set -g _jam_broken 1
        return 0
    end
    set -l rc 121
    if test -n "$_jam_py" -a -x "$_jam_py"
        command $_jam_py -I -S -c $_jam_boot hook-fetch -- $argv[1] >&2
        set rc $status
    end
    if test $rc -eq 121
        # The jam script honours $PYTHONPATH, whose empty or relative entries name the working
        # directory: run it from / so that a cd never imports code from the directory entered
        # (JAM_HOOK_CWD tells it where the shell is, for its messages).
        JAM_HOOK_CWD=$argv[1] command /bin/sh -c 'cd / && exec "$@"' jam-hook $_jam_bin hook-fetch -- $argv[1] >&2
        set rc $status
    end
    if test $rc -ne 0 -a $rc -ne 130
        printf 'jam: %s hook-fetch failed (exit %s); the cd hook is off in this shell\n' $_jam_bin $rc >&2
        set -g _jam_broken 1
    end
    return 0
end

_jam_on_pwd # the directory the shell starts in
