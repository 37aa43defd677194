"""End to end in a real terminal: `jam tui` in tmux at 80x24 (NO_COLOR set), keys sent, the
screen read back with capture-pane, `q` exits 0. The test waits for what the screen shows
(a deadline, never a fixed sleep) and for the shell's signal that jam exited."""

from __future__ import annotations

import os
import subprocess
import time

from tests.conftest import make_file, require_tool
from tests.safety_support import make_tree


def _screen(tmux, sock) -> str:
    return subprocess.run([tmux, "-L", sock, "capture-pane", "-p", "-t", "jam"], capture_output=True,
                          text=True).stdout


def _wait_for(tmux, sock, pred, what: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        text = _screen(tmux, sock)
        if pred(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"the screen never showed {what}:\n{text}")
        time.sleep(0.05)  # polling the screen for a condition, not synchronising on time


def test_jam_tui_in_a_real_terminal(tmp_path, jam_bin):
    tmux = require_tool("tmux")
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from jam_core.root import Root

    t = make_tree(tmp_path)
    make_file(t.root / "alpha.bin", 120_000, 1)
    make_file(t.root / "beta.txt", 5_000, 2)
    stash(Root.find(t.root), ["alpha.bin"], make_plugin_manager())
    sock = f"jamtest-{os.getpid()}"
    done = tmp_path / "exit-code"
    env = dict(os.environ, NO_COLOR="1", TERM="xterm-256color")
    cmd = f"cd {t.root} && {jam_bin} tui; echo $? > {done}; {tmux} -L {sock} wait-for -S jam-exited"
    subprocess.run([tmux, "-L", sock, "new-session", "-d", "-s", "jam", "-x", "80", "-y", "24", cmd],
                   env=env, check=True)
    try:
        first = _wait_for(tmux, sock, lambda s: "beta.txt" in s and "stashed" in s, "the listing")
        assert "root/" in first.splitlines()[0]  # the path, top line
        row = next(line for line in first.splitlines() if "alpha.bin" in line)
        assert "stub" in row and "vault" in row
        subprocess.run([tmux, "-L", sock, "send-keys", "-t", "jam", "f"], check=True)
        after = _wait_for(tmux, sock, lambda s: any("alpha.bin" in ln and " local " in ln for ln in s.splitlines()),
                          "alpha.bin fetched")
        assert "Traceback" not in after
        subprocess.run([tmux, "-L", sock, "send-keys", "-t", "jam", "q"], check=True)
        subprocess.run([tmux, "-L", sock, "wait-for", "jam-exited"], check=True, timeout=60)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], capture_output=True)
    assert (t.root / "alpha.bin").stat().st_mode & 0o200  # the file is back, writable again
