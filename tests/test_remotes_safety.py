"""Roots and remotes never overlap; a remote is known by its identity marker; `jam remote`
and `jam init` write only the root's own config; `jam demo` leaves the real default remote
alone (issue 8, brief H1). Real files, real xattrs, the real `jam` command."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from jam_core.errors import RemoteError, UsageError
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import MARKER_NAME, marker_bytes, new_remote_id, parse_marker
from jam_core.ops.remotes import add_remote, ensure_identity
from jam_core.root import Root, default_remote_location
from tests.conftest import make_file
from tests.safety_support import is_stub, jam, make_tree


def one_line(res) -> str:
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jam: "), res.err
    return lines[0]


def own_config(root: Path) -> str:
    return (root / ".jam" / "config.toml").read_text()


def marker_id(location: Path) -> str:
    return parse_marker((location / MARKER_NAME).read_bytes())


# -- 1. a root and a remote never overlap --------------------------------------------------

def test_init_home_is_refused_before_anything_is_created(isolated_home):
    res = jam("init", str(isolated_home), cwd=isolated_home, check=2)
    line = one_line(res)
    assert "contains jam's default remote" in line and str(default_remote_location()) in line, line
    assert "XDG_DATA_HOME" in line
    assert not (isolated_home / ".jam").exists()
    assert not default_remote_location().exists()


def test_init_inside_the_default_remote_is_refused(isolated_home):
    inside = default_remote_location() / "objects" / "x"
    inside.mkdir(parents=True)
    res = jam("init", str(inside), cwd=isolated_home, check=2)
    assert "is inside jam's default remote" in one_line(res)
    assert not (inside / ".jam").exists()


def test_init_around_or_inside_another_roots_dir_remote_is_refused(tmp_path):
    t = make_tree(tmp_path / "a")
    # around it: tmp_path/a holds a-root and its remote a/root-remote
    res = jam("init", str(tmp_path / "a"), cwd=tmp_path, check=2)
    line = one_line(res)
    assert "contains the remote 'vault'" in line and str(t.remote) in line, line
    assert not (tmp_path / "a" / ".jam").exists()
    # inside it
    sub = t.remote / "sub"
    sub.mkdir()
    assert "is inside the remote 'vault'" in one_line(jam("init", str(sub), cwd=tmp_path, check=2))
    assert not (sub / ".jam").exists()
    # through a symlink to it: the resolved path counts
    link = tmp_path / "link"
    link.symlink_to(t.remote)
    assert "is inside the remote" in one_line(jam("init", str(link / "sub"), cwd=tmp_path, check=2))
    assert not (sub / ".jam").exists()
    # a directory apart is fine
    apart = tmp_path / "apart"
    apart.mkdir()
    jam("init", str(apart), cwd=tmp_path)


@pytest.fixture
def bind_mount(tmp_path):
    """``bind(src, dst)``: a real bind mount (root only), unmounted at the end."""
    mounted = []

    def bind(src: Path, dst: Path) -> None:
        dst.mkdir(parents=True)
        res = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {res.stderr.decode().strip()}")
        mounted.append(dst)

    yield bind
    for d in reversed(mounted):
        subprocess.run(["umount", str(d)], check=True)


def test_a_bind_mount_cannot_hide_an_overlap(tmp_path, bind_mount):
    """Same directory under another path that no realpath reveals: the inode check sees it."""
    t = make_tree(tmp_path)
    view = tmp_path / "view"
    bind_mount(t.remote, view)
    (t.remote / "deep").mkdir()
    res = jam("init", str(view / "deep"), cwd=tmp_path, check=2)
    assert "is inside the remote 'vault'" in one_line(res)
    assert not (t.remote / "deep" / ".jam").exists()
    # and the other way round: a remote added at a bind-mounted view of the root
    rview = tmp_path / "rview"
    bind_mount(t.root, rview)
    res = jam("remote", "add", "usb", str(rview), cwd=t.root, check=2)
    assert "is this jam root" in one_line(res), res.err
    assert "usb" not in own_config(t.root)


def test_remote_add_empty_url_is_refused(tmp_path):
    t = make_tree(tmp_path)
    before = own_config(t.root)
    res = jam("remote", "add", "usb", "", cwd=t.root, check=2)
    assert "URL is empty" in one_line(res)
    assert own_config(t.root) == before
    res = jam("remote", "add", "usb", "  ", cwd=t.root, check=2)
    assert "URL is empty" in one_line(res)


@pytest.mark.parametrize("where", ["dot", "inside", "parent", "symlink", "other-root"])
def test_remote_add_overlapping_a_root_is_refused(tmp_path, where):
    t = make_tree(tmp_path)
    (t.root / "sub").mkdir()
    other = make_tree(tmp_path / "o")
    cwd = t.root
    if where == "dot":
        url = "."
        cwd = t.root / "sub"
    elif where == "inside":
        url = str(t.root / "sub")
    elif where == "parent":
        url = str(tmp_path)
    elif where == "symlink":
        (tmp_path / "alias").symlink_to(t.root / "sub")
        url = str(tmp_path / "alias")
    else:
        (other.root / "d").mkdir()
        url = "file://" + str(other.root / "d")
    before = own_config(t.root)
    res = jam("remote", "add", "usb", url, cwd=cwd, check=2)
    assert "must not overlap" in one_line(res)
    assert own_config(t.root) == before
    assert not (t.root / "sub" / "objects").exists() and not (t.root / "sub" / MARKER_NAME).exists()
    assert not (other.root / "d" / "objects").exists()


def test_remote_add_apart_from_every_root_is_accepted(tmp_path):
    t = make_tree(tmp_path)
    usb = tmp_path / "usb"
    usb.mkdir()
    jam("remote", "add", "usb", str(usb), cwd=t.root)
    assert (usb / MARKER_NAME).is_file()


# -- 2. a remote has an identity -----------------------------------------------------------

def test_remote_add_writes_a_marker_and_records_its_id(tmp_path):
    t = make_tree(tmp_path)
    rid = marker_id(t.remote)
    assert f'id = "{rid}"' in own_config(t.root)
    assert Root(t.root).remotes()[0].options["id"] == rid


def test_remote_add_onto_another_roots_remote_reuses_its_id(tmp_path):
    a = make_tree(tmp_path, "a")
    b_root = tmp_path / "b"
    b_root.mkdir()
    jam("init", str(b_root), cwd=tmp_path)
    jam("remote", "add", "shared", str(a.remote), cwd=b_root)
    rid = marker_id(a.remote)
    assert f'id = "{rid}"' in own_config(b_root) and f'id = "{rid}"' in own_config(a.root)


def test_marker_is_never_written_over_another_jams(tmp_path, monkeypatch):
    """Two jams adding the same drive: the second finds the first's marker at the instant it
    links its own into place, and takes the first's id."""
    import jam_dir

    usb = tmp_path / "usb"
    usb.mkdir()
    first = new_remote_id()
    real_link = os.link

    def link(src, dst, *a, **kw):
        if os.fspath(dst).endswith(MARKER_NAME) and not os.path.exists(dst):
            (usb / MARKER_NAME).write_bytes(marker_bytes(first))  # the other jam wins the race
        return real_link(src, dst, *a, **kw)

    t = make_tree(tmp_path)
    monkeypatch.setattr(os, "link", link)
    remote, _ = add_remote(Root(t.root), make_plugin_manager(), "usb", str(usb))
    monkeypatch.undo()
    assert marker_id(usb) == first and remote.options["id"] == first
    assert [p.name for p in usb.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert jam_dir  # the backend under test


def unplug(location: Path) -> Path:
    """The drive is unplugged: its mount point stays behind as an empty directory."""
    away = location.with_name(location.name + "-unplugged")
    location.rename(away)
    location.mkdir()
    return away


def test_unplugged_drive_empty_mount_point_is_refused_by_stash_and_checkout(tmp_path):
    t = make_tree(tmp_path)
    make_file(t.root / "a", 200_000, 1)
    make_file(t.root / "b", 200_000, 2)
    jam("stash", "a", cwd=t.root)
    assert is_stub(t.root / "a")
    unplug(t.remote)
    res = jam("stash", "b", cwd=t.root, check=1)
    assert "identity marker is missing" in one_line(res) and "unplugged" in res.err
    assert not is_stub(t.root / "b")
    res = jam("checkout", "a", cwd=t.root, check=1)
    assert "identity marker is missing" in one_line(res)
    assert is_stub(t.root / "a")
    assert list(t.remote.iterdir()) == []  # nothing created in the empty mount point


def test_ensure_identity_refuses_an_empty_mount_point(tmp_path):
    t = make_tree(tmp_path)
    root, pm = Root(t.root), make_plugin_manager()
    remote = root.remotes()[0]
    with Session() as s:
        ensure_identity(root, remote, pm, s)  # the drive is there
    unplug(t.remote)
    with Session() as s, pytest.raises(RemoteError) as exc:
        ensure_identity(root, remote, pm, s)
    msg = str(exc.value)
    assert "'vault'" in msg and str(t.remote) in msg and "identity marker is missing" in msg
    assert "unplugged" in msg and "\n" not in msg
    assert list(t.remote.iterdir()) == []


def test_ensure_identity_refuses_another_remotes_marker(tmp_path):
    t = make_tree(tmp_path)
    root, pm = Root(t.root), make_plugin_manager()
    remote = root.remotes()[0]
    away = unplug(t.remote)
    (t.remote / "objects").mkdir()
    (t.remote / MARKER_NAME).write_bytes(marker_bytes(new_remote_id()))
    with Session() as s, pytest.raises(RemoteError, match="another remote's marker"):
        ensure_identity(root, remote, pm, s)
    assert marker_id(away) == remote.options["id"]


@pytest.mark.parametrize("marker", ["garbage", "symlink", "fifo", "huge"])
def test_a_hostile_marker_is_not_a_marker(tmp_path, marker):
    t = make_tree(tmp_path)
    root, pm = Root(t.root), make_plugin_manager()
    remote = root.remotes()[0]
    m = t.remote / MARKER_NAME
    real = m.read_bytes()
    m.unlink()
    if marker == "garbage":
        m.write_bytes(b"\x00\xffnot json")
    elif marker == "symlink":
        outside = tmp_path / "outside.json"
        outside.write_bytes(real)  # even a valid marker through a symlink is refused
        m.symlink_to(outside)
    elif marker == "fifo":
        os.mkfifo(m)  # opening it must not hang
    else:
        m.write_bytes(real + b" " * (1 << 20))
    with Session() as s, pytest.raises(RemoteError, match="is not a jam remote marker"):
        ensure_identity(root, remote, pm, s)


def test_a_malformed_recorded_id_is_a_config_error(tmp_path):
    t = make_tree(tmp_path)
    root = Root(t.root)
    root.update_config(lambda own: own["remote"]["vault"].__setitem__("id", "../../etc"))
    with Session() as s, pytest.raises(UsageError, match="malformed"):
        ensure_identity(root, root.remotes()[0], make_plugin_manager(), s)


def forget_id(t) -> Root:
    """Make the remote look added by a jam without identities."""
    root = Root(t.root)
    (t.remote / MARKER_NAME).unlink()
    root.update_config(lambda own: own["remote"]["vault"].pop("id"))
    assert "id =" not in own_config(t.root)
    return root


def test_an_older_remote_with_objects_gets_a_marker_on_first_use(tmp_path):
    t = make_tree(tmp_path)
    user_cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "jam" / "config.toml"
    user_cfg.parent.mkdir(parents=True)
    user_cfg.write_text('[policy.lru]\nkeep = "25%"\n')
    root = forget_id(t)
    remote = root.remotes()[0]
    with Session() as s:
        ensure_identity(root, remote, make_plugin_manager(), s)
        ensure_identity(root, remote, make_plugin_manager(), s)  # once per command: cached
    rid = marker_id(t.remote)
    text = own_config(t.root)
    assert f'id = "{rid}"' in text and "policy" not in text
    # the next command checks against it
    with Session() as s:
        ensure_identity(Root(t.root), Root(t.root).remotes()[0], make_plugin_manager(), s)


def test_an_older_remote_without_objects_is_refused_and_left_alone(tmp_path):
    t = make_tree(tmp_path)
    root = forget_id(t)
    remote = root.remotes()[0]
    unplug(t.remote)
    with Session() as s, pytest.raises(RemoteError, match="identity marker is missing"):
        ensure_identity(root, remote, make_plugin_manager(), s)
    assert list(t.remote.iterdir()) == []
    assert "id =" not in own_config(t.root)


def test_a_backend_without_identity_is_accepted(tmp_path):
    t = make_tree(tmp_path)
    root = Root(t.root)

    class NoIdentity:
        class hook:
            @staticmethod
            def remote_id(**kw):
                return None

    with Session() as s:
        ensure_identity(root, root.remotes()[0], NoIdentity, s)


# -- 7. only the root's own keys are written ------------------------------------------------

def test_init_and_remote_add_write_only_the_roots_own_keys(tmp_path):
    user_cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "jam" / "config.toml"
    user_cfg.parent.mkdir(parents=True)
    user_cfg.write_text('[policy.lru]\nkeep = "25%"\n')
    root = tmp_path / "r"
    root.mkdir()
    jam("init", str(root), cwd=tmp_path)
    assert "policy" not in own_config(root) and "keep" not in own_config(root)
    usb = tmp_path / "usb"
    usb.mkdir()
    jam("remote", "add", "usb", str(usb), cwd=root)
    jam("remote", "remove", "usb", cwd=root)
    assert "policy" not in own_config(root) and "keep" not in own_config(root)
    assert Root(root).config["policy"]["lru"]["keep"] == "25%"  # readers still see the merge


# -- 8. demo ---------------------------------------------------------------------------------

def test_demo_leaves_the_real_default_remote_alone(tmp_path):
    res = jam("demo", cwd=tmp_path, env=os.environ | {"TMPDIR": str(tmp_path)})
    assert "demo FAILED" not in res.out
    default = default_remote_location()
    assert not default.exists() or not any(p.is_file() for p in (default / "objects").rglob("*"))


# -- 9. .jam/ is private -----------------------------------------------------------------------

def test_init_makes_jams_directories_private_whatever_the_umask(tmp_path):
    root = tmp_path / "r"
    (root / ".jam" / "visits").mkdir(parents=True, mode=0o755)  # left by an interrupted init
    old = os.umask(0)
    try:
        Root.init(root)
    finally:
        os.umask(old)
    for d in (".jam", ".jam/tmp", ".jam/visits"):
        st = os.lstat(root / d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), d


def test_a_planted_jam_symlink_is_refused(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / ".jam").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="not a directory"):
        Root.init(root)
    assert list(elsewhere.iterdir()) == []


# -- 10. list and remove ---------------------------------------------------------------------

def test_remote_list_is_offline_and_remove_works(tmp_path):
    t = make_tree(tmp_path)
    unplug(t.remote)  # list must not touch the remote
    res = jam("remote", "list", "--json", cwd=t.root)
    assert '"vault"' in res.out
    jam("remote", "remove", "vault", cwd=t.root)
    assert "vault" not in own_config(t.root)
    assert "no remotes" in jam("remote", "list", cwd=t.root).out


def test_remote_remove_refuses_while_it_holds_the_only_copy_a_version_needs(tmp_path):
    """A committed file that stays local has no stub, yet its snapshot and (once the file is
    edited or deleted) its old content live only on the remote: forgetting the remote must be
    refused as for a stub's only copy."""
    t = make_tree(tmp_path)
    make_file(t.root / "notes.txt", 70_000)
    jam("commit", "-m", "first", cwd=t.root)
    (t.root / "notes.txt").unlink()  # the old version now exists only as a kept version
    res = jam("remote", "remove", "vault", cwd=t.root, check=2)
    assert "kept versions" in res.err and "--move-to" in res.err and len(res.err.strip().splitlines()) == 1
    assert "vault" in own_config(t.root)
    jam("remote", "remove", "vault", "--force", cwd=t.root)
    assert "vault" not in own_config(t.root)
