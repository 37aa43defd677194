"""Many small objects over SFTP, continued (issue 13): what each one still costs.

- paramiko is imported without ``invoke`` (which paramiko.config imports at once, with
  unittest.mock and asyncio, only to run ssh_config ``Match exec`` lines): ~80 ms of CPU on
  every command that talks to a server; a ``Match exec`` line still works (invoke is imported
  when one runs).
- A batch fsyncs each directory it renamed into through a handle its connection keeps open
  (one request per directory instead of open + fsync + close); a directory the run had to make
  again (it went away) is opened afresh, never fsynced through a handle of the one that is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Remote, Session

    url = {url!r}
    pm = make_plugin_manager(load_entrypoints=False)
    remote = Remote(name="far", kind="sftp", url=url, location=url, options={{}})
    with Session() as s:
        print(pm.hook.check_remote(remote=remote, session=s, create=False))
    print("paramiko" in sys.modules, "invoke" in sys.modules)
    """
)


def run_check(url: str) -> list[str]:
    res = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO), url=url)],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_talking_to_a_server_does_not_import_invoke(sftp_remote, sftp_store):
    """A real connection (check_remote: login, stat, a probe written) in a fresh interpreter:
    paramiko is in, invoke is not. Mutation-checked against ``_import_paramiko``'s
    ``sys.modules["invoke"] = None``."""
    out = run_check(f"sftp://jamtest{sftp_store}")
    assert out[0].startswith("sftp "), out
    assert out[1] == "True False", "invoke was imported with paramiko"


def test_match_exec_in_ssh_config_still_runs(sshd, sftp_remote, sftp_store):
    """The host is reached only through a ``Match exec`` block (HostName, Port, User, key):
    the command runs (invoke imported then) and the connection works; a ``Match exec`` that
    fails does not apply. Mutation-checked against the ``_Invoke`` stand-in (without it paramiko
    raises its "invoke is not installed" error for the line)."""
    config = Path(os.environ["HOME"]) / ".ssh" / "config"
    key = Path(os.environ["HOME"]) / ".ssh" / "id_ed25519"
    config.write_text(config.read_text() + textwrap.dedent(
        f"""
        Match host viaexec exec "false"
            Port 1
        Match host viaexec exec "test -d /"
            HostName 127.0.0.1
            Port {sshd.port}
            User {sshd.user}
            IdentityFile {key}
            IdentitiesOnly yes
        """))
    out = run_check(f"sftp://viaexec{sftp_store}")
    assert out[0].startswith("sftp "), out
    assert out[1] == "True True", "the Match exec line did not run through invoke"
