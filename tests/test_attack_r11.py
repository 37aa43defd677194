"""Review R11 (an attacker's): the cd hooks in real shells, the policies' edges and SFTP.

Each test injects one hostile condition on real files, real shells (bash, zsh, fish under a
terminal, driven by pexpect and synchronised on prompt markers, never on sleeps) or a real sshd.
A test marked xfail(strict=True) is a hole found by this review (its reason says which); the
others pass only thanks to the guard their docstring names (each was mutation-checked: the
guard commented out once, the test failed).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_file, require_tool
from tests.terminal import PromptShell

pexpect = pytest.importorskip("pexpect")

PROMPT = "R11PROMPT>"


class Term(PromptShell):
    """One interactive shell under a terminal, its prompt ``PROMPT``, the hook sourced once."""

    def __init__(self, kind: str, hook: Path, cwd: Path, env: dict, setup: str = ""):
        super().__init__(kind, PROMPT, cwd, env)
        self.run(f"source {shlex.quote(str(hook))}")
        if setup:
            self.run(setup)

    def alive_after(self, *lines: str) -> bool:
        """Type ``lines``, then ask the shell to answer: False when it ended meanwhile."""
        for line in lines:
            self.p.sendline(line)
        token = "ALIVE" + os.urandom(4).hex()
        self.p.sendline(f"echo {token[:7]}''{token[7:]}")
        try:
            self.p.expect_exact(token)
        except pexpect.EOF:
            return False
        return True


def _env() -> dict:
    e = dict(os.environ)
    e.update(TERM="xterm", LC_ALL="C.UTF-8", JAM_DISABLE="", SHELL="/bin/sh", JAM_BACKGROUND="0",
             JAM_HOOK_SERVER="0")
    e.pop("PROMPT_COMMAND", None)
    return e


def _hook_file(kind: str, jam_bin: str, tmp_path: Path) -> Path:
    text = subprocess.run([jam_bin, "hook", kind, "--bin", jam_bin], capture_output=True, text=True,
                          check=True, env=_env()).stdout
    # Mutation checks without touching shell/ (a shared tree): R11_MUTATE="old=>new[|||old=>new]"
    # edits the hook this test sources (a guard taken out once, or a proposed fix put in).
    for pair in filter(None, os.environ.get("R11_MUTATE", "").split("|||")):
        old, new = pair.split("=>", 1)
        if kind == "bash" or old in text:
            assert old in text, f"R11_MUTATE: {old!r} is not in the {kind} hook"
            text = text.replace(old, new)
    path = tmp_path / f"hook.{kind}"
    path.write_text(text)
    return path


@pytest.fixture
def stubbed(jam_root):
    """A root with two stubs in data/ and an empty directory elsewhere."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    for i in range(2):
        make_file(jam_root.path / f"data/f{i}", 80_000 + i, seed=i)
    assert len(stash(jam_root, ["data"], make_plugin_manager()).done) == 2
    (jam_root.path / "plain").mkdir()
    return jam_root


@pytest.fixture
def term(request, tmp_path, jam_bin):
    made = []

    def make(kind: str, setup: str = "") -> Term:
        t = Term(kind, _hook_file(kind, jam_bin, tmp_path), tmp_path, _env(), setup)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# -- 1. the cd hooks ----------------------------------------------------------------------------


def test_bash_with_errexit_survives_a_prompt_after_a_failed_status(term, stubbed):
    """`set -e` in an interactive bash: `false && true` leaves $?=1 without ending the shell
    (a command of an && list is exempt). The hook's `return "$_jam_status"` then makes the
    PROMPT_COMMAND fail, and errexit ends the shell; without the hook it lives on.
    Guard (mutation-checked): shell/jam.bash _jam_install's `_jam_hook && :` in PROMPT_COMMAND."""
    t = term("bash", "set -e")
    assert t.alive_after(f"cd {shlex.quote(str(stubbed.path / 'plain'))}", "false && true", "echo after")


def test_bash_err_trap_runs_once_for_a_failed_command(term, stubbed):
    """`trap 'echo failed' ERR` (a common prompt helper): `false` runs it once; the hook's
    `return "$_jam_status"` is a second failing command at the prompt and runs it again.
    Guard (mutation-checked): shell/jam.bash _jam_install's `_jam_hook && :` in PROMPT_COMMAND."""
    t = term("bash", "trap 'echo R11''ERR' ERR")
    t.run(f"cd {shlex.quote(str(stubbed.path / 'plain'))}")
    t.p.sendline("false")
    t.p.expect_exact(PROMPT)
    out = t.p.before
    t.p.sendline("echo R11''END")
    t.p.expect_exact("R11END")
    t.p.expect_exact(PROMPT)
    assert out.count("R11ERR") == 1, out


def test_bash_with_errexit_survives_a_directory_whose_mark_cannot_be_written(term, stubbed):
    """The mark of a directory whose %-encoded path from the root is longer than 255 bytes
    cannot be made (ENAMETOOLONG; README: such a directory gets no mark). bash's
    `{ : >|"$_jam_mark"; } 2>/dev/null` hides the message but fails, and under `set -e` the
    interactive shell ends on a plain `cd`.
    Guard (mutation-checked): shell/jam.bash _jam_visit's `|| :` after the mark's redirection
    and _jam_install's `_jam_hook && :` (either one holds it; both taken out, the test fails)."""
    deep = stubbed.path / ("a" * 200) / ("b" * 200)
    deep.mkdir(parents=True)
    t = term("bash", "set -e")
    assert t.alive_after(f"cd {shlex.quote(str(deep))}", "echo after")


def _is_stub(path: Path) -> bool:
    from jam_core.scan import STUB, classify

    return classify(str(path), os.lstat(path))[0] == STUB


# A directory name that is code in every shell's syntax, a glob, a newline, a leading '-' and
# a byte that is not UTF-8: the hook must treat it as data from $PWD to `jam hook-fetch`.
HOSTILE = os.fsdecode(b"-n $(touch PWNED) `touch PWNED`; touch PWNED\n*?[a] \xff")


def test_a_cd_into_a_hostile_directory_name_fetches_there_and_runs_nothing(jam_root, jam_bin, tmp_path):
    """Stubs in a directory named like code: the cd fetches them (the name reaches jam whole)
    and nothing of the name runs. Guard (bash; zsh and fish do not split words, and passed
    unguarded): the quoting of `_jam_fetch "$PWD"` and of `hook-fetch -- "$1"` (either one
    unquoted: the name splits into words and the fetch fails)."""
    kind = "bash"
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    d = jam_root.path / "data" / HOSTILE
    data = {f"g{i}": make_file(d / f"g{i}", 70_000 + i, seed=i) for i in range(2)}
    assert len(stash(jam_root, [f"data/{HOSTILE}"], make_plugin_manager()).done) == 2
    env = dict(_env(), R11DIR=str(d))
    t = Term(kind, _hook_file(kind, jam_bin, tmp_path), tmp_path, env)
    try:
        out = t.run('cd -- "$R11DIR"')
    finally:
        t.close()
    assert "fetched 2 files" in out, out
    assert "Traceback" not in out and "off in this shell" not in out, out
    for name, content in data.items():
        assert not _is_stub(d / name) and (d / name).read_bytes() == content, "differs"
    assert not list(tmp_path.rglob("PWNED")) and not list(jam_root.path.rglob("PWNED"))


def test_zsh_with_err_exit_and_no_unset_survives_a_mark_that_cannot_be_written(term, stubbed):
    """zsh with `setopt err_exit no_unset` (the same hostile user as above): a cd into a
    directory whose mark cannot be made (name > 255 bytes) and a prompt after `false && true`
    leave the shell alive. Guard: `emulate -L zsh` in _jam_chpwd (without it the failed
    redirection ends the shell)."""
    deep = stubbed.path / ("a" * 200) / ("b" * 200)
    deep.mkdir(parents=True)
    t = term("zsh", "setopt err_exit no_unset")
    assert t.alive_after(f"cd {shlex.quote(str(deep))}", "false && true", f"cd {shlex.quote(str(stubbed.path))}",
                         "echo after")


def _jam(jam_bin: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([jam_bin, *args], capture_output=True, cwd=cwd, env=_env(), timeout=120)


def test_a_root_whose_path_is_not_utf8_is_registered_for_the_hooks(tmp_path, jam_bin):
    """Linux paths are bytes: a directory named in Latin-1 (an old archive, a USB stick). `jam
    init` there must either work whole (the roots list holds its bytes, so the hooks, which
    compare bytes, find it) or refuse before making anything, with one line.
    Guard (mutation-checked): root.register_root works in bytes (os.fsencode, read_bytes/write_bytes)."""
    from jam_core.root import roots_file

    top = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    top.mkdir()
    res = _jam(jam_bin, "init", str(top))
    assert b"internal error" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
    if res.returncode == 0:
        assert bytes(top) in roots_file().read_bytes().splitlines()
    else:
        assert res.returncode == 2 and res.stderr.startswith(b"jam: ") and res.stderr.count(b"\n") == 1
        assert not (top / ".jam").exists()


def test_a_root_whose_path_has_a_newline_is_never_lost_from_the_roots_list(tmp_path, jam_bin):
    """`jam init` of `nl<newline>C` writes `.../nl` and `C` as two roots. registered_roots()
    then knows neither (neither has .jam/config.toml), so from another root `jam remote add y
    ROOT/sub`, a dir remote inside this root, is accepted: invariant 10 (a root and a remote
    never overlap) broken, and the hooks never fetch in this root. Either `jam init` refuses
    such a path with one line (nothing made), or the root stays known.
    Guard (mutation-checked): Root.init's refusal of a path with b"\\n" (before anything is made)."""
    odd = tmp_path / "nl\nC"
    (odd / "sub").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    assert _jam(jam_bin, "init", str(other)).returncode == 0
    res = _jam(jam_bin, "init", str(odd))
    if res.returncode != 0:
        assert res.returncode == 2 and res.stderr.startswith(b"jam: ") and res.stderr.count(b"\n") == 1, res.stderr
        assert not (odd / ".jam").exists()
        return
    res = _jam(jam_bin, "remote", "add", "y", str(odd / "sub"), cwd=other)
    assert res.returncode == 2 and b"must not overlap" in res.stderr, res.stderr


# -- 2. policies --------------------------------------------------------------------------------


def _config(root, text: str) -> None:
    root.config_path.write_text(root.config_path.read_text() + "\n" + text + "\n")


def _old(path: Path, size: int, seed: int, days: float = 10) -> None:
    import time

    make_file(path, size, seed)
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_budget_counts_a_hard_linked_file_once(runner, jam_root):
    """A 1 MB file with ten names (hard links: one inode, 1 MB on this disk; policies never
    take it) and three old 100 KB files: 1.3 MB on disk, under `max_local = "2MB"`. The budget
    must leave everything local; it counts 10.3 MB and nominates the three files.
    Guard (mutation-checked): policy.records._scan counts a local file's size // st_nlink."""
    from jam_core.cli import main

    _old(jam_root.path / "big/one", 1_000_000, seed=1)
    for i in range(9):
        os.link(jam_root.path / "big/one", jam_root.path / f"big/link{i}")
    for i in range(3):
        _old(jam_root.path / f"old{i}", 100_000, seed=10 + i)
    _config(jam_root, '[policy.budget]\nmax_local = "2MB"')
    du = sum({(st.st_dev, st.st_ino): st.st_blocks * 512
              for st in (os.lstat(p) for p in jam_root.path.rglob("*") if p.is_file() and ".jam" not in p.parts)}
             .values())
    assert du < 2_000_000  # what this disk holds for the root: under the budget
    res = runner.invoke(main, ["stash", "--auto", "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "would stash 0 of 3" in res.output, res.output


def test_budget_counts_a_sparse_file_by_what_it_holds_on_this_disk(runner, jam_root):
    """A sparse 50 MB disk image that holds 4 KiB (a VM image, a torrent being filled in: not
    a stub) and three old 100 KB files: 0.3 MB on this disk, under `max_local = "2MB"`.
    The budget ("keep the bytes on this disk under a size") must leave them local; it counts
    the image's 50 MB and nominates the three files.
    Guard (mutation-checked): policy.records.on_disk's min(st_size, st_blocks * 512)."""
    from jam_core.cli import main

    img = jam_root.path / "vm.img"
    with open(img, "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(50_000_000)
    for i in range(3):
        _old(jam_root.path / f"old{i}", 100_000, seed=10 + i)
    assert os.lstat(img).st_blocks * 512 < 100_000  # sparse on this filesystem
    _config(jam_root, '[policy.budget]\nmax_local = "2MB"')
    res = runner.invoke(main, ["stash", "--auto", "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "would stash 0 of" in res.output, res.output


# -- 3. SFTP ------------------------------------------------------------------------------------


def _cli(runner, *args, ok=True):
    from jam_core.cli import main

    res = runner.invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, (res.output, res.stderr)
    assert "Traceback" not in res.output and "Traceback" not in (res.stderr or "")
    return res


def _oid(path: Path) -> str:
    from jam_core.stub import XATTR, StubRecord

    return StubRecord.unpack(os.getxattr(path, XATTR)).oid


@pytest.fixture
def mirrored(runner, tmp_path, sshd, sftp_store, monkeypatch):
    """A root with `far` (sftp, tier 0) and `near` (dir, tier 1), `[place] copies = 2`, and
    f.bin stashed on both; then `copies = 1` (either copy alone would do)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    _cli(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    _cli(runner, "remote", "add", "far", f"sftp://{sshd.alias}{sftp_store}")
    near = tmp_path / "near"
    near.mkdir()
    _cli(runner, "remote", "add", "near", str(near), "--tier", "1")
    _cli(runner, "remote", "remove", "default")
    cfg = tree / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + "\n[place]\ncopies = 2\n")
    data = make_file(tree / "f.bin", 300_000, seed=7)
    assert "stashed 1 file" in _cli(runner, "stash", "f.bin").output
    cfg.write_text(cfg.read_text().replace("copies = 2", "copies = 1"))
    return tree, sftp_store, near, data


def test_drop_never_counts_an_sftp_object_that_is_a_symlink_to_another_file(runner, mirrored, tmp_path):
    """The server's copy of f.bin (on `far`) is replaced by a symlink to another file of the
    same size (someone with access to the server; a restore gone wrong). jam's own rules say a
    symlink in objects/ is not its object (remove() and list_objects() refuse it), and a fetch
    through it fails its hash. `jam drop --from near f.bin` asks `far` live whether it holds
    the object: sftp has no hash_object, so `has` answers, by a stat that follows the symlink
    and compares sizes. The drop then removes near's copy, the only intact one, and f.bin can
    never come back.
    Guard (mutation-checked): jam_sftp's hash_object (the copy read and hashed) and Ops.has's lstat +
    S_ISREG (with hash_object taken out, has() by a stat and a size fails this test)."""
    from jam_core.objects import object_relpath

    tree, far, near, data = mirrored
    oid = _oid(tree / "f.bin")
    obj = far / "objects" / object_relpath(oid)
    decoy = tmp_path / "decoy"  # elsewhere on the server, the same size, other bytes
    decoy.write_bytes(os.urandom(len(data)))
    obj.chmod(0o644)
    obj.unlink()
    obj.symlink_to(decoy)
    res = _cli(runner, "drop", "--from", "near", "f.bin", ok=False)
    kept = (near / "objects" / object_relpath(oid)).is_file()
    assert res.exit_code == 1 and kept, (res.exit_code, res.output, res.stderr)


def test_a_config_dated_in_the_future_costs_one_process_not_one_per_cd(stubbed, tmp_path, jam_bin):
    """config.toml restored from a backup or copied from a machine whose clock runs ahead,
    dated a day ahead. The hook asks jam once when config.toml is newer than
    ROOT/.jam/stubdirs (hook.depth may have changed); jam refreshes the index and stamps it
    with the time now, still older than the config, so every later `cd` inside the root (even
    with nothing to fetch) starts a Python process: the hook's "no process" promise gone until
    that date passes.
    Guard (mutation-checked): hook.index._stamp dates the index max(now, config.toml's mtime)."""
    import time

    log = tmp_path / "calls"
    log.write_text("")
    wrapper = tmp_path / "jam-logged"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
                       f"exec {shlex.quote(jam_bin)} \"$@\"\n")
    wrapper.chmod(0o755)
    ahead = time.time() + 86400
    os.utime(stubbed.config_path, (ahead, ahead))
    for d in ("sub1", "sub2", "sub3"):
        (stubbed.path / "plain" / d).mkdir()
    text = subprocess.run([jam_bin, "hook", "bash", "--bin", str(wrapper)], capture_output=True, text=True,
                          check=True, env=_env()).stdout
    hook = tmp_path / "hook.bash"
    hook.write_text(text)
    t = Term("bash", hook, tmp_path, _env())
    try:
        for d in ("sub1", "sub2", "sub3"):
            out = t.run(f"cd {shlex.quote(str(stubbed.path / 'plain' / d))}")
            assert "Traceback" not in out and "off in this shell" not in out, out
    finally:
        t.close()
    calls = [line for line in log.read_text().splitlines() if line.startswith("hook-fetch")]
    assert len(calls) <= 1, calls


def test_a_drop_never_removes_through_a_symlinked_objects_directory(runner, tmp_path, tmp_path_factory, sshd,
                                                                    sftp_store, monkeypatch):
    """Two sftp remotes on one server, `far` and `far2`, f.bin stashed on both (`copies = 2`);
    then the admin merges far2's storage into far's (`far2/objects -> far/objects`: the same
    objects, one directory). With `copies = 1`, `jam drop --from far2 f.bin` asks `far` live
    (it holds the object) and would remove far2's copy through the symlinked objects/: far's
    copy, the last one. Guard: Meta.location_present's lstat of objects/ (jam_sftp/meta.py;
    a stat, or no check, and the drop removes the last copy): the drop is refused."""
    from jam_core.objects import object_relpath

    store2 = tmp_path_factory.mktemp("store2")
    tree = tmp_path / "tree"
    tree.mkdir()
    _cli(runner, "init", str(tree))
    monkeypatch.chdir(tree)
    _cli(runner, "remote", "add", "far", f"sftp://{sshd.alias}{sftp_store}")
    _cli(runner, "remote", "add", "far2", f"sftp://{sshd.alias}{store2}")
    _cli(runner, "remote", "remove", "default")
    import shutil

    cfg = tree / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + "\n[place]\ncopies = 2\n")
    make_file(tree / "f.bin", 300_000, seed=8)
    assert "stashed 1 file" in _cli(runner, "stash", "f.bin").output
    oid = _oid(tree / "f.bin")
    shutil.rmtree(store2 / "objects")  # the admin merges far2's storage into far's (same objects)
    (store2 / "objects").symlink_to(sftp_store / "objects")
    cfg.write_text(cfg.read_text().replace("copies = 2", "copies = 1"))
    res = _cli(runner, "drop", "--from", "far2", "f.bin", ok=False)
    assert res.exit_code == 1, (res.output, res.stderr)
    assert (sftp_store / "objects" / object_relpath(oid)).is_file(), "the last copy of f.bin was removed"


@pytest.mark.parametrize("path", ["/srv/%2e%2e/etc", "/srv/.%2E/etc", "/srv%2F..%2Fetc", "/~/%2e%2e", "/srv/x%00y"])
def test_an_sftp_url_that_decodes_to_dotdot_or_nul_is_refused(path, monkeypatch):
    """`..` and NUL spelt in percent-escapes (a URL pasted from a web page, or crafted): the
    path is checked after it is decoded, so `%2e%2e` is refused as `..` is. Guard:
    jam_sftp.url.parse decodes (`unquote`) before its `..`/NUL check (checked on the raw
    path, every one of these passes)."""
    from jam_core import UsageError
    from jam_sftp.url import parse

    with pytest.raises(UsageError, match=r"may not contain '\.\.' or NUL"):
        parse(f"sftp://host{path}")


def test_a_host_key_marked_revoked_in_known_hosts_is_refused(sshd, sftp_remote):
    """The server's key is in known_hosts (it was trusted), and the admin has since marked it
    `@revoked` (a stolen key: OpenSSH's sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"). `ssh` refuses
    to connect ("marked as revoked"); jam must too (invariant 9: host keys are checked as ssh
    does), with one line. paramiko's HostKeys.load reads `@revoked` as a host name, fails on
    the line and jam skips the rest of the file: the key stays trusted.
    Guard (mutation-checked): jam_sftp.connect.check_host_key's `key.asbytes() in known.revoked`."""
    from jam_core import RemoteError
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session

    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    line = sshd.known_hosts_line()
    kh.write_text(f"{line}\n@revoked {line}\n")
    ssh = subprocess.run(["ssh", "-F", str(kh.parent / "config"), "-o", "BatchMode=yes",
                          "-o", f"UserKnownHostsFile={kh}", sshd.alias, "true"],
                         capture_output=True, text=True, timeout=60)
    assert ssh.returncode != 0 and "revoked" in ssh.stderr  # what OpenSSH does with this file
    with Session() as s, pytest.raises(RemoteError) as exc:
        make_plugin_manager().hook.check_remote(remote=sftp_remote, session=s, create=False)
    assert "revoked" in str(exc.value).lower() and "\n" not in str(exc.value)


def test_a_cert_authority_line_does_not_hide_the_known_hosts_lines_after_it(sshd, sftp_remote, tmp_path):
    """An organisation's SSH CA in known_hosts (`@cert-authority *.corp ssh-ed25519 ...`, as
    its setup guide says), then the server's own key. ssh connects (the CA line is for other
    hosts); jam's _load_host_keys hands the whole file to paramiko's HostKeys.load, which
    raises on the CA line, and the `except Exception: pass` drops every line after it.
    Guard (mutation-checked): jam_sftp.connect.KnownHosts.load reads line by line and add_line skips an
    @cert-authority line alone (stopping at it, as HostKeys.load's exception did, fails this test)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from tests.sshd import keygen

    ca = keygen(tmp_path / "corp_ca").split()
    kh = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    kh.write_text(f"@cert-authority *.corp.example {ca[0]} {ca[1]}\n{sshd.known_hosts_line()}\n")
    ssh = subprocess.run(["ssh", "-F", str(kh.parent / "config"), "-o", "BatchMode=yes",
                          "-o", f"UserKnownHostsFile={kh}", sshd.alias, "true"],
                         capture_output=True, text=True, timeout=60)
    assert ssh.returncode == 0, ssh.stderr  # what OpenSSH does with this file
    with Session() as s:
        assert make_plugin_manager().hook.check_remote(remote=sftp_remote, session=s, create=False)


def test_a_file_dated_past_2262_is_one_line_and_its_neighbours_are_stashed(jam_root, jam_bin):
    """A file with a bogus far-future mtime (a zip with a broken date, a camera's clock): the
    stub format keeps mtime_ns as a signed 64-bit number, whose last day is 2262-04-11. A
    stash of its directory (by hand, or `--auto`: budget nominates it, every run) dies with
    `jam: internal error: error: argument out of range` and stashes none of the batch (and
    has read them all: their atimes now say "just used"). Either jam records such a date or
    it leaves that file local with one line, and stashes the others.
    Guard (mutation-checked): stash._skip_reason's int64 mtime_ns range check."""
    d = jam_root.path / "d"
    for i in range(3):
        _old(d / f"old{i}", 100_000, seed=20 + i)
    far = d / "far-future"
    make_file(far, 100_000, seed=30)
    t = 13_569_465_600  # 2400-01-01
    os.utime(far, (t, t))
    assert os.stat(far).st_mtime == t  # the filesystem keeps it (ext4: up to 2446)
    res = _jam(jam_bin, "stash", "d", cwd=jam_root.path)
    assert b"internal error" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
    assert all(_is_stub(d / f"old{i}") for i in range(3)), (res.stdout, res.stderr)
    if not _is_stub(far):
        # left local with one line, like the other files a stash leaves as they are (exit 0: a
        # `stash --auto` would otherwise fail every run for a date the user may not control)
        assert res.returncode == 0 and b"far-future" in res.stderr, res.stderr
    assert os.stat(far).st_mtime == t


def test_a_file_saved_between_the_plan_and_the_stash_is_not_stashed_by_policy(jam_root, monkeypatch):
    """`[policy.age] older_than = "30d"`: a.txt and b.txt are old, the plan nominates both.
    Between the plan and the stash (the plan of a big tree takes seconds, and the stash waits
    for the root's lock while another jam holds it: a `cd` that fetches, a second `stash
    --auto`), the user saves a.txt. The stash then makes a stub of the file just saved: its new
    content is safe on the remote, but the file the user is working on leaves the disk on a
    decision made about its old version. Pins are re-checked under the lock; the file's own
    state (size, mtime) must be too. Injected at the instant: jam_core.ops.stash.stash, which
    carry_out calls with the plan.
    Guard (mutation-checked): stash._stash skips a file whose ctime is not before the plan's began_ns (policy.plan.carry_out passes it)."""
    import time

    import jam_core.ops.stash as stash_mod
    from jam_core.manager import make_plugin_manager
    from jam_core.policy.plan import stash_auto

    for name in ("a.txt", "b.txt"):
        _old(jam_root.path / name, 100_000, seed=hash(name) % 100, days=60)
    _config(jam_root, '[policy.age]\nolder_than = "30d"')
    real = stash_mod.stash
    saved = b"the user's new version\n" * 5000

    def save_then_stash(root, rels, pm, *args, **kwargs):
        assert sorted(rels) == ["a.txt", "b.txt"]  # the plan chose both
        (root.path / "a.txt").write_bytes(saved)  # an editor's save: new bytes, mtime now
        now = time.time()
        os.utime(root.path / "a.txt", (now, now))
        return real(root, rels, pm, *args, **kwargs)

    monkeypatch.setattr(stash_mod, "stash", save_then_stash)
    stash_auto(jam_root, make_plugin_manager())
    assert _is_stub(jam_root.path / "b.txt")
    assert not _is_stub(jam_root.path / "a.txt"), "the file just saved was stashed on the old plan"
    assert (jam_root.path / "a.txt").read_bytes() == saved, "differs"


def test_a_moved_root_is_served_by_the_hook_again_or_doctor_says_why_not(tmp_path, jam_bin):
    """`mv ~/data ~/archive` (a root renamed, as people do with folders). The roots list the
    hooks read still names the old path, so a cd into the moved root never fetches; `jam
    init .` there answers "already a jam root" and registers nothing; `jam doctor` reports
    "the cd hook is installed" and no problem. Either a command in the root puts it back on
    the list (then the hook fetches), or doctor warns with a way out.
    Guard (mutation-checked): Root.init's register_root(p) for an existing root (`existing == p`)."""
    from jam_core.root import roots_file

    old, new = tmp_path / "data", tmp_path / "archive"
    (old / "d").mkdir(parents=True)
    make_file(old / "d" / "f", 100_000, seed=3)
    assert _jam(jam_bin, "init", str(old)).returncode == 0
    assert _jam(jam_bin, "stash", "d", cwd=old).returncode == 0
    old.rename(new)
    Path(os.environ["HOME"], ".bashrc").write_text('eval "$(jam hook bash)"\n')
    _jam(jam_bin, "init", str(new))  # what a user tries first
    _jam(jam_bin, "status", cwd=new)
    doctor = _jam(jam_bin, "doctor", cwd=new)
    listed = str(new).encode() in roots_file().read_bytes().splitlines()
    warned = b"roots" in doctor.stdout + doctor.stderr and doctor.returncode != 0
    if not warned:
        res = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                              f"source {shlex.quote(str(_hook_file('bash', jam_bin, tmp_path)))}; "
                              f"cd {shlex.quote(str(new / 'd'))}; _jam_hook"],
                             capture_output=True, text=True, env=_env(), timeout=120)
        assert listed and not _is_stub(new / "d" / "f"), (res.stderr, doctor.stdout)


def test_jam_init_through_a_symlinked_path_registers_the_path_the_shell_uses(tmp_path, jam_bin):
    """`~/data -> /mnt/disk/data` (a synced tree on a second disk, linked into home): the user
    types `cd ~/data; jam init`. os.path.abspath(".") is getcwd(), the physical path, so the
    roots list gets /mnt/disk/data while every shell's $PWD says ~/data: the README's "a root
    is matched by the path you cd through" then means never. The hook in that same shell must
    fetch there.
    Guard (mutation-checked): cli.files._as_the_shell_says (a relative PATH joined to $PWD)."""
    real, link = tmp_path / "disk" / "data", tmp_path / "data"
    (real / "d").mkdir(parents=True)
    link.symlink_to(real)
    make_file(real / "d" / "f", 100_000, seed=4)
    init = subprocess.run(["bash", "--norc", "--noprofile", "-c", f"cd {shlex.quote(str(link))} && {jam_bin} init"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    assert _jam(jam_bin, "stash", "d", cwd=real).returncode == 0
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                          f"source {shlex.quote(str(_hook_file('bash', jam_bin, tmp_path)))}; "
                          f"cd {shlex.quote(str(link / 'd'))}; _jam_hook"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert not _is_stub(real / "d" / "f"), (init.stdout, res.stderr)


def test_fish_fetches_in_a_directory_whose_name_ends_with_a_newline(jam_root, jam_bin, tmp_path):
    """Stubs in `z\\n`, none in its neighbour `z`. bash and zsh fetch on a cd into `z\\n`; fish
    computes `rest` (the path from the root) with `string sub ... | string collect`, which
    drops the trailing newline, so it asks the index about `/z` (no stubs: nothing fetched)
    and writes the visit mark of `/z`. (`string collect -N` is no fix: it keeps the newline
    `string sub` adds too.) Fix: a '/' after $PWD before `string collect`, dropped again in
    the mark's name (see the report).
    Guard (mutation-checked): shell/jam.fish _jam_on_pwd's `"$PWD/"` before `string collect`."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    (jam_root.path / "z").mkdir()
    data = make_file(jam_root.path / "z\n" / "f", 100_000, seed=5)
    assert len(stash(jam_root, ["z\n"], make_plugin_manager()).done) == 1
    hook = _hook_file("fish", jam_bin, tmp_path)
    env = dict(_env(), R11DIR=str(jam_root.path / "z\n"))
    res = subprocess.run([require_tool("fish"), "--no-config", "-c", f"source {shlex.quote(str(hook))}; cd $R11DIR"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert not _is_stub(jam_root.path / "z\n" / "f"), res.stderr
    assert (jam_root.path / "z\n" / "f").read_bytes() == data, "differs"


def _holds(pid: int, ino: int) -> bool:
    """Does process ``pid`` hold a descriptor on the file with inode ``ino``? (False once gone)"""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.stat(f"/proc/{pid}/fd/{name}").st_ino == ino:
                return True
        except OSError:
            continue
    return False


def test_a_jamignore_that_is_a_fifo_is_refused_not_waited_on(jam_root, jam_bin):
    """The pins file is opened O_NONBLOCK and must be a regular file (a FIFO there is refused
    with one line); `.jamignore` sits in the tree itself (a tar unpacked at the top can hold a
    FIFO) and load_ignore reads it with Path.read_text: the open blocks until a writer comes,
    so a cron'd `jam stash --auto` never ends. Made deterministic: this test holds the FIFO's
    other end, waits until jam has it open (it is reading), then closes it: jam then reads an
    empty ignore file and goes on (exit 0); refused, it exits 2 with one line.
    Guard (mutation-checked): policy.records.load_ignore's O_NONBLOCK open and root.read_capped's S_ISREG
    check (either one holds it: both taken out, the test fails)."""
    import time

    _old(jam_root.path / "old.bin", 100_000, seed=1, days=60)
    _config(jam_root, '[policy.age]\nolder_than = "30d"')
    fifo = jam_root.path / ".jamignore"
    os.mkfifo(fifo)
    ino = os.stat(fifo).st_ino
    other_end = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    proc = subprocess.Popen([jam_bin, "stash", "--auto", "--dry-run"], cwd=jam_root.path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not _holds(proc.pid, ino) and time.monotonic() < deadline:
            time.sleep(0.005)  # polling a condition (jam has the FIFO open, or has ended), not a delay
    finally:
        os.close(other_end)  # a jam still reading it now reads an empty file and goes on
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert err.startswith(b"jam: ") and err.count(b"\n") == 1 and b".jamignore" in err, err
