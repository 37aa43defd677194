"""Run OpenSSH's sshd on 127.0.0.1 for tests and benchmarks (shared by tests/ and bench/).

``SSHD(workdir).start()`` creates a host key, a client key, an ``sshd_config`` and an
``authorized_keys`` under ``workdir``, starts ``sshd -D -e`` in the foreground on a free port
and returns once sshd has logged that it listens and the port accepts. ``write_home(home)``
fills a client HOME (``~/.ssh/known_hosts``, ``id_ed25519``, ``config`` with a ``Host``
alias). ``kill()`` ends the server and every session it forked (sshd's per-connection children
call ``setsid``, so killing the listener's process group alone would leave them alive).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/usr/bin/sshd")
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")
START_TIMEOUT = 20.0


def find_sshd() -> str | None:
    """The sshd binary, or None when OpenSSH's server is not installed."""
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("sshd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "jam-test") -> str:
    """Create an unencrypted ed25519 key at ``path``; return the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class SSHD:
    """One OpenSSH server for one test (or one benchmark run)."""

    alias = "jamtest"

    def __init__(self, workdir: Path, sshd: str | None = None, sftp_subsystem: str = "internal-sftp"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sshd = sshd or find_sshd()
        if self.sshd is None:
            raise FileNotFoundError("sshd (openssh-server) is not installed")
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.sftp_subsystem = sftp_subsystem
        self.proc: subprocess.Popen | None = None
        self._log_lines: list[str] = []
        self.host_pub = keygen(self.host_key, "jam-test-host")
        self.client_pub = keygen(self.client_key, "jam-test-client")
        self.authorized_keys.write_text(self.client_pub + "\n")
        self._write_config()

    def _write_config(self) -> None:
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UseDNS no",
                    "MaxStartups 100",
                    "MaxSessions 32",
                    "LogLevel INFO",
                    f"Subsystem sftp {self.sftp_subsystem}",
                    "",
                ]
            )
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "SSHD":
        """Start sshd in the foreground; return once it listens (its log line, then a connect)."""
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        listening = threading.Event()
        self._log_lines = []
        self.proc = subprocess.Popen(
            [self.sshd, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        proc = self.proc

        def drain() -> None:
            assert proc.stderr is not None
            with open(self.log, "a") as log:
                for line in proc.stderr:
                    self._log_lines.append(line)
                    log.write(line)
                    log.flush()
                    if "Server listening" in line:
                        listening.set()
            listening.set()  # EOF: sshd exited; start() sees it below

        threading.Thread(target=drain, name=f"sshd-log-{self.port}", daemon=True).start()
        if not listening.wait(START_TIMEOUT) or proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"sshd did not start: {''.join(self._log_lines[-20:]).strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # sshd logs before accept(); a connect proves the socket is live
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"sshd is not accepting on port {self.port}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the server and every session it forked (a crash or a pulled cable)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pids = [proc.pid, *_descendants(proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    stop = kill

    def restart(self) -> "SSHD":
        """Kill and start again on the same port with the same keys."""
        self.kill()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- client side -------------------------------------------------------------------------

    @property
    def host_pattern(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def known_hosts_line(self) -> str:
        key_type, key_b64 = self.host_pub.split()[:2]
        return f"{self.host_pattern} {key_type} {key_b64}"

    def ssh_config_text(self, identity: Path) -> str:
        return (
            f"Host {self.alias}\n"
            "    HostName 127.0.0.1\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {identity}\n"
            "    IdentitiesOnly yes\n"
        )

    def write_home(self, home: Path) -> Path:
        """Fill ``home/.ssh`` with known_hosts, the client key and an ssh_config alias."""
        ssh = Path(home) / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ssh / "id_ed25519"
        shutil.copyfile(self.client_key, key)
        key.chmod(0o600)
        shutil.copyfile(self.client_key.with_name("id_ed25519.pub"), ssh / "id_ed25519.pub")
        (ssh / "known_hosts").write_text(self.known_hosts_line() + "\n")
        (ssh / "config").write_text(self.ssh_config_text(key))
        return ssh

    def ssh_options(self, home: Path) -> list[str]:
        """Options for OpenSSH clients (ssh, sftp, rsync -e) that use ``home``'s files."""
        ssh = Path(home) / ".ssh"
        return ["-F", str(ssh / "config"), "-o", f"UserKnownHostsFile={ssh / 'known_hosts'}", "-o", "BatchMode=yes"]
