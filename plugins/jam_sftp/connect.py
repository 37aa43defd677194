"""Open SSH connections the way OpenSSH would: ssh_config, known_hosts, the agent, key files.

Imported lazily (paramiko costs ~120 ms): only when a command talks to an sftp remote.

- ``~/.ssh/config`` then ``/etc/ssh/ssh_config`` (first value wins, as in ssh): HostName, User,
  Port, IdentityFile, IdentitiesOnly, IdentityAgent none, ProxyCommand, ProxyJump,
  UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, ConnectTimeout.
- Host keys: a known key is used; a changed key is refused; an unknown key is refused with its
  SHA256 fingerprint, or, on a terminal, asked about as ssh does and then recorded.
  ``StrictHostKeyChecking no/accept-new`` is ignored: jam never accepts a key silently.
- Authentication: agent keys, then key files; never passwords (nothing secret is stored).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from paramiko.buffered_pipe import BufferedPipe
from paramiko.message import Message
from paramiko.sftp import (
    CMD_INIT,
    CMD_VERSION,
)

from jam_core import RemoteError, UsageError

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
WINDOW_SIZE = 1 << 26  # 64 MiB channel window: the server never stalls waiting for us
MAX_PACKET = 1 << 18  # 256 KiB: OpenSSH's largest; fewer, larger packets cost less Python
READ_AHEAD = 1 << 16  # bytes a small read of the SFTP stream may take at once
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk")

_prompt_lock = threading.Lock()  # one host-key question at a time


def quiet_paramiko() -> None:
    """paramiko logs (``Socket exception: ...``, tracebacks of its transport thread) through
    the ``paramiko`` logger, which Python's last-resort handler would print on stderr: jam
    reports what went wrong in one line of its own. ``JAM_DEBUG`` set lets them through.
    Exceptions that escape a paramiko thread are not printed either (logged at debug level)."""
    log = logging.getLogger("paramiko")
    if os.environ.get("JAM_DEBUG"):
        return
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    log.propagate = False
    previous = threading.excepthook
    if getattr(previous, "_jam_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, paramiko.Transport) or type(args.thread).__module__.startswith("paramiko"):
            log.debug("exception in %s", args.thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
            return
        previous(args)

    hook._jam_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


quiet_paramiko()


@dataclass
class Endpoint:
    """One SSH destination with ssh_config applied."""

    name: str  # the host as the user wrote it (maybe an alias)
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)
    identities_explicit: bool = False
    identities_only: bool = False
    use_agent: bool = True
    proxy_command: str | None = None
    proxy_jump: str | None = None
    known_hosts: list[str] = field(default_factory=list)
    global_known_hosts: list[str] = field(default_factory=list)
    host_key_alias: str | None = None
    hash_known_hosts: bool = False
    connect_timeout: float = 15.0

    @property
    def host_key_name(self) -> str:
        """The name known_hosts uses: ``host`` on port 22, ``[host]:port`` otherwise."""
        name = self.host_key_alias or self.hostname
        return name if self.port == 22 else f"[{name}]:{self.port}"

    def label(self) -> str:
        """How messages name the server: ``alias (user@host:port)`` or ``user@host:port``."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        real = f"{self.user}@{host}:{self.port}"
        return real if self.name == self.hostname else f"{self.name} ({real})"

    def ssh_hint(self) -> str:
        """The ssh command that reaches this server (to trust its key the usual way)."""
        if self.name != self.hostname:
            return f"ssh {self.name}"
        port = f"-p {self.port} " if self.port != 22 else ""
        return f"ssh {port}{self.user}@{self.hostname}"


def _yes(value: Any) -> bool:
    return str(value).lower() in ("yes", "true", "on", "1")


def _ssh_configs() -> list[paramiko.SSHConfig]:
    out = []
    for path in (Path("~/.ssh/config").expanduser(), Path("/etc/ssh/ssh_config")):
        try:
            if path.is_file():
                out.append(paramiko.SSHConfig.from_path(str(path)))
        except Exception as exc:  # a config ssh itself may accept but paramiko cannot read
            raise UsageError(f"cannot read {path}: {exc}") from None
    return out


def resolve(
    host: str, user: str | None = None, port: int | None = None, connect_timeout: float | None = None
) -> Endpoint:
    """Apply ssh_config to ``host``; values from the URL (user, port) win."""
    merged: dict[str, Any] = {}
    for config in _ssh_configs():
        try:
            found = config.lookup(host)
        except Exception as exc:
            raise UsageError(f"ssh config for {host!r}: {exc}") from None
        for key, value in found.items():
            if key == "hostname" and value == host and "hostname" in merged:
                continue
            merged.setdefault(key, value)
    try:
        cfg_port = int(merged.get("port", 22))
    except ValueError:
        raise UsageError(f"ssh config for {host!r}: bad Port {merged.get('port')!r}") from None
    identity = list(merged.get("identityfile") or [])
    explicit = bool(identity)
    if not identity:
        identity = [str(Path("~/.ssh").expanduser() / name) for name in DEFAULT_IDENTITIES]
    user_kh = merged.get("userknownhostsfile")
    if isinstance(user_kh, list):
        user_kh = " ".join(user_kh)
    known = [os.path.expanduser(p) for p in (user_kh or "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()]
    global_kh = merged.get("globalknownhostsfile")
    if isinstance(global_kh, list):
        global_kh = " ".join(global_kh)
    global_known = (global_kh or "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2").split()
    timeout = connect_timeout
    if timeout is None:
        try:
            timeout = float(merged.get("connecttimeout", 15))
        except ValueError:
            timeout = 15.0
    proxy_command = merged.get("proxycommand")
    proxy_jump = merged.get("proxyjump")
    agent = str(merged.get("identityagent", "")).lower() != "none"
    return Endpoint(
        name=host,
        hostname=merged.get("hostname", host),
        port=port or cfg_port,
        user=user or merged.get("user") or _local_user(),
        identity_files=[os.path.expanduser(p) for p in identity],
        identities_explicit=explicit,
        identities_only=_yes(merged.get("identitiesonly", "no")),
        use_agent=agent,
        proxy_command=None if not proxy_command or proxy_command.lower() == "none" else proxy_command,
        proxy_jump=None if not proxy_jump or proxy_jump.lower() == "none" else proxy_jump,
        known_hosts=[p for p in known if p.lower() != "none"],
        global_known_hosts=[p for p in global_known if p.lower() != "none"],
        host_key_alias=merged.get("hostkeyalias"),
        hash_known_hosts=_yes(merged.get("hashknownhosts", "no")),
        connect_timeout=timeout,
    )


def _local_user() -> str:
    import getpass

    return getpass.getuser()


# -- host keys ------------------------------------------------------------------------------


class KnownHosts:
    """The host keys of the known_hosts files, read line by line as ssh reads them.

    A line that cannot be read (a key type paramiko does not know, garbage) is skipped alone,
    never the rest of its file. ``@revoked`` keys are collected in ``revoked`` and refused for
    every host, before anything else is looked at (a stolen key: sshd(8) "SSH_KNOWN_HOSTS FILE
    FORMAT"; a revoked key is refused even where its line names another host, stricter than
    ssh). ``@cert-authority`` lines (host certificates, which jam does not use) and any other
    marker are skipped. A host's key is accepted if any line for it holds that exact key.
    """

    def __init__(self) -> None:
        self.lines: list[tuple[list[str], paramiko.PKey]] = []  # (host names, key) of every host key line
        self.revoked: set[bytes] = set()  # the key blobs of the @revoked lines

    def load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:  # unreadable: as if absent, as ssh does
            return
        for line in text.splitlines():
            self.add_line(line)

    def add_line(self, line: str) -> None:
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            return
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3 or marker not in (None, "@revoked"):
            return  # @cert-authority (host certificates) or an unknown marker: not a host key line
        names, key_type, b64 = fields[:3]
        try:
            blob = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            return
        if marker == "@revoked":
            self.revoked.add(blob)
            return
        try:
            key = paramiko.PKey.from_type_string(key_type, blob)
        except Exception:  # a key type paramiko does not know, a damaged key: this line alone
            return
        self.lines.append(([h for h in names.split(",") if h], key))

    def lookup(self, name: str) -> dict[str, paramiko.PKey] | None:
        """The keys known for ``name`` by key type (the first line's of each type), or None."""
        out: dict[str, paramiko.PKey] = {}
        for hosts, key in self.lines:
            if key.get_name() not in out and any(_host_matches(h, name) for h in hosts):
                out[key.get_name()] = key
        return out or None

    def holds(self, name: str, key: paramiko.PKey) -> bool:
        """Does a line for ``name`` hold exactly ``key``?"""
        blob = key.asbytes()
        return any(k.asbytes() == blob and any(_host_matches(h, name) for h in hosts) for hosts, k in self.lines)


def _host_matches(pattern: str, name: str) -> bool:
    """A known_hosts host name (plain, or hashed ``|1|salt|hash``) names ``name``."""
    if pattern == name:
        return True
    if pattern.startswith("|1|"):
        try:
            return hmac.compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
        except Exception:  # a damaged hashed name
            return False
    return False


def _load_host_keys(ep: Endpoint) -> KnownHosts:
    keys = KnownHosts()
    for path in [*ep.known_hosts, *ep.global_known_hosts]:
        if os.path.isfile(path):
            keys.load(path)
    return keys


def _key_kind(key: paramiko.PKey) -> str:
    name = key.get_name()
    return {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}.get(name, "ECDSA" if name.startswith("ecdsa") else name)


def _describe(key: paramiko.PKey) -> str:
    return f"{_key_kind(key)} key {key.fingerprint}"


def check_host_key(ep: Endpoint, key: paramiko.PKey, known: KnownHosts) -> None:
    """Refuse a revoked key; accept a known key; refuse a changed or unknown one (or ask on a terminal)."""
    name = ep.host_key_name
    if key.asbytes() in known.revoked:
        raise RemoteError(
            f"REVOKED HOST KEY for {ep.label()}: it sent {_describe(key)}, marked @revoked in known_hosts; "
            "refusing to connect (the key may be stolen: ask the server's admin)"
        )
    if known.holds(name, key):
        return
    entry = known.lookup(name)
    if entry is not None and key.get_name() in entry:
        expected = entry[key.get_name()]
        raise RemoteError(
            f"HOST KEY CHANGED for {ep.label()}: it sent {_describe(key)} but known_hosts has "
            f"{expected.fingerprint} for {name}; refusing to connect (a man-in-the-middle, or the server "
            f"was reinstalled: if you know why, run `ssh-keygen -R '{name}'` and `{ep.ssh_hint()}` once)"
        )
    others = f" (known_hosts has only other key types for {name})" if entry else ""
    if _ask(ep, key):
        _record(ep, key)
        return
    port = f"-p {ep.port} " if ep.port != 22 else ""
    raise RemoteError(
        f"unknown host key for {ep.label()}: {_describe(key)}{others}; jam never trusts a key silently. "
        f"If the fingerprint is right, run `{ep.ssh_hint()}` once and answer yes, "
        f"or `ssh-keyscan {port}{ep.hostname} >> ~/.ssh/known_hosts`"
    )


def _ask(ep: Endpoint, key: paramiko.PKey) -> bool:
    """Ask as ssh does, only when a person is at a terminal."""
    if os.environ.get("JAM_NO_PROMPT") or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    with _prompt_lock:
        sys.stderr.write(
            f"The authenticity of host '{ep.host_key_name}' can't be established.\n"
            f"{_key_kind(key)} key fingerprint is {key.fingerprint}.\n"
            "Are you sure you want to continue connecting (yes/no)? "
        )
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
    return answer == "yes"


def _record(ep: Endpoint, key: paramiko.PKey) -> None:
    if not ep.known_hosts:
        return
    path = Path(ep.known_hosts[0])
    name = ep.host_key_name
    if ep.hash_known_hosts:
        name = paramiko.HostKeys.hash_host(name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
    sys.stderr.write(
        f"Warning: Permanently added '{ep.host_key_name}' ({_key_kind(key)}) to the list of known hosts.\n"
    )


# -- authentication -------------------------------------------------------------------------


def _file_keys(ep: Endpoint) -> tuple[list[tuple[str, paramiko.PKey | None, bytes | None]], list[str]]:
    """(path, private key or None, public blob or None) for each identity file, and notes."""
    out: list[tuple[str, paramiko.PKey | None, bytes | None]] = []
    notes: list[str] = []
    for path in ep.identity_files:
        if not os.path.isfile(path):
            if ep.identities_explicit:
                notes.append(f"{path} missing")
            continue
        pub_blob = None
        pub_path = path + ".pub"
        if os.path.isfile(pub_path):
            try:
                pub_blob = paramiko.PublicBlob.from_file(pub_path).key_blob
            except Exception:
                pub_blob = None
        try:
            key = paramiko.PKey.from_path(path)
        except Exception as exc:
            encrypted = isinstance(exc, paramiko.PasswordRequiredException) or "password" in str(exc).lower()
            if not encrypted:
                notes.append(f"{path} unreadable ({exc})")
                continue
            out.append((path, None, pub_blob))
            notes.append(f"{path} is encrypted (add it to ssh-agent: ssh-add {path})")
            continue
        out.append((path, key, key.asbytes()))
    return out, notes


def authenticate(t: paramiko.Transport, ep: Endpoint) -> None:
    """Try agent keys and key files in OpenSSH's order; raise RemoteError if none is accepted."""
    files, notes = _file_keys(ep)
    agent_keys: list[paramiko.AgentKey] = []
    if ep.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = list(paramiko.Agent().get_keys())
        except Exception:
            notes.append("ssh-agent unreachable")
    file_blobs = {blob for _, _, blob in files if blob}
    attempts: list[tuple[str, paramiko.PKey]] = []
    seen: set[bytes] = set()
    for key in agent_keys:  # agent keys that match an IdentityFile first
        if key.asbytes() in file_blobs:
            attempts.append((f"agent key {key.fingerprint}", key))
            seen.add(key.asbytes())
    if not ep.identities_only:
        for key in agent_keys:
            if key.asbytes() not in seen:
                attempts.append((f"agent key {key.fingerprint}", key))
                seen.add(key.asbytes())
    for path, key, blob in files:
        if key is not None and blob not in seen:
            attempts.append((path, key))
            seen.add(blob)
    tried: list[str] = []
    for label, key in attempts:
        try:
            rest = t.auth_publickey(ep.user, key)
        except paramiko.AuthenticationException:
            if not t.is_active():  # paramiko says "Authentication failed." when the link died
                raise RemoteError(f"connection to {ep.label()} lost during login; try again") from None
            tried.append(label)
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if not t.is_active():  # the connection died: not a refusal
                raise RemoteError(
                    f"connection to {ep.label()} lost during login ({exc or type(exc).__name__}); try again"
                ) from None
            tried.append(label)
            notes.append(f"server closed the connection ({exc or type(exc).__name__})")
            break
        if t.is_authenticated():
            return
        raise RemoteError(
            f"{ep.label()} wants more than a key after {label} ({', '.join(rest)}); jam only uses keys"
        )
    what = ", ".join(tried) if tried else "no usable key found"
    extra = f"; {'; '.join(notes)}" if notes else ""
    raise RemoteError(
        f"{ep.label()} refused authentication as {ep.user!r} (tried: {what}{extra}); "
        "add a key to ssh-agent or set IdentityFile in ~/.ssh/config (jam never uses passwords)"
    )


# -- the connection -------------------------------------------------------------------------


class _Chunks:
    """What a ``ChunkPipe`` holds: the bytes as they arrived, a list of chunks (the first maybe
    partly read); the few operations ``BufferedPipe`` makes on its array."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes | memoryview] = collections.deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def frombytes(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def take(self, limit: int | None) -> bytes:
        """Remove and return the first ``limit`` bytes (all of them with None)."""
        n = self.size if limit is None else min(limit, self.size)
        chunks = self.chunks
        if chunks and len(chunks[0]) == n:  # a whole chunk: no copy at all
            self.size -= n
            first = chunks.popleft()
            return first if isinstance(first, bytes) else bytes(first)
        parts = []
        left = n
        while left:
            c = chunks[0]
            if len(c) <= left:
                parts.append(chunks.popleft())
                left -= len(c)
            else:
                view = c if isinstance(c, memoryview) else memoryview(c)
                parts.append(view[:left])
                chunks[0] = view[left:]
                left = 0
        self.size -= n
        return b"".join(parts)

    def __delitem__(self, key: slice) -> None:  # only after a take: nothing left to drop
        pass


class ChunkPipe(BufferedPipe):
    """paramiko's channel buffer (same locking, waiting and closing) keeping what arrives as a
    list of chunks: a feed appends the bytes (no copy into an array), a read of ``n`` takes
    whole chunks (one join) and slices only the last. paramiko's array is copied out and then
    memmoved down on every read, all that is buffered each time: with a download's reads in
    flight (``READ_INFLIGHT`` x 255 KiB) that was megabytes per read."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _Chunks()  # type: ignore[assignment]

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.frombytes(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.take(limit)


class SFTP(paramiko.SFTPClient):
    """paramiko's client, plus the server's extensions and a read path without quadratic copies."""

    extensions: dict[str, bytes]

    def __init__(self, sock: Any):
        super().__init__(sock)
        chan = self.sock
        if isinstance(chan, paramiko.Channel) and len(chan.in_buffer) == 0:
            # nothing arrives before a request is sent (the version is in): a buffer without copies
            pipe = ChunkPipe()
            pipe._closed = chan.in_buffer._closed
            chan.in_buffer = pipe
        # requests waiting for replies: a plain dict (paramiko's WeakValueDictionary costs a
        # KeyedRef per request, ~4% of a small-file upload's client CPU); every request of
        # jam's is answered or the connection is dropped, so nothing stays behind
        self._expecting = {}

    def _send_version(self) -> int:
        m = Message()
        m.add_int(3)
        self._send_packet(CMD_INIT, m)
        t, data = self._read_packet()
        if t != CMD_VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        msg = Message(data)
        version = msg.get_int()
        self.extensions = {}
        while msg.packet.tell() < len(data):
            name = msg.get_text()
            self.extensions[name] = msg.get_binary()
        return version

    _rbuf = b""  # bytes received past the last packet read (small replies come in bursts)
    _rpos = 0

    def _read_all(self, n: int) -> bytes:
        """``n`` bytes of the stream. Small reads take what has arrived, up to ``READ_AHEAD``
        bytes, in one ``recv`` (a burst of status replies then costs one channel read instead
        of two per reply); large ones ask for exactly what they need (no copy of big data)."""
        buf, pos = self._rbuf, self._rpos
        have = len(buf) - pos
        if have >= n:
            self._rpos = pos + n
            return buf[pos : pos + n]
        parts = [buf[pos:]] if have else []
        need = n - have
        self._rbuf, self._rpos = b"", 0
        while need > 0:
            x = self.sock.recv(max(need, READ_AHEAD))
            if not x:
                raise EOFError()
            if len(x) > need:
                parts.append(x[:need])
                self._rbuf, self._rpos = x, need
                break
            parts.append(x)
            need -= len(x)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def reply_ready(self) -> bool:
        """A reply (or part of one) has arrived and can be read without waiting."""
        return len(self._rbuf) > self._rpos or self.sock.recv_ready()


# -- channel data sealed in batches --------------------------------------------------------------

_P = "_Packetizer__"  # paramiko.Packetizer's private attributes (its send path, by name)
_DATA_HEAD = struct.Struct(">IBBII")  # packet length, padding length, CHANNEL_DATA, channel, data length
_MSG_CHANNEL_DATA = 94
SEAL_BATCH = 1 << 19  # channel data sealed and written to the socket together (16 packets of 32 KiB)
_PACKETIZER_FIELDS = ("write_lock", "block_engine_out", "iv_out", "sequence_number_out", "sent_bytes",
                      "sent_packets", "aead_out", "compress_engine_out", "dump_packets", "block_size_out",
                      "received_bytes_overflow", "received_packets_overflow")
SEAL_INTO = True  # seal straight into the batch (``encrypt_into``, cryptography >= 45) where offered
_seal_buffers = threading.local()  # send_data's buffers, one set per thread
sealed_packets = 0  # channel packets sent through send_data's own sealing (tests check it is used)


def _aead_ready(p: Any) -> bool:
    """The packetizer seals with AES-GCM (``aes128/256-gcm@openssh.com``), no compression, no
    packet dumps, and has every field ``send_data`` reads: its own sealing applies (otherwise
    paramiko's path is taken)."""
    get = p.__dict__.get
    return (all(_P + f in p.__dict__ for f in _PACKETIZER_FIELDS) and get(_P + "aead_out") is True
            and get(_P + "block_engine_out") is not None and get(_P + "compress_engine_out") is None
            and not get(_P + "dump_packets") and get(_P + "block_size_out") == 16)


def send_data(chan: paramiko.Channel, data: memoryview) -> None:
    """Send all of ``data`` on ``chan`` (SSH_MSG_CHANNEL_DATA packets within its send window).

    paramiko costs ~1 s of CPU per 512 MiB on this path beyond the cipher itself (a Message per
    32 KiB packet, five copies of its data, a ``getrandom`` and a socket write per packet). Under
    AES-GCM the packets of up to ``SEAL_BATCH`` bytes of window are sealed here instead, exactly
    as ``Packetizer.send_message`` seals one (the length as associated data, random padding to
    16 bytes, the nonce's counter and the sequence number advanced per packet, the rekey
    thresholds counted), under the same locks (the transport's ``clear_to_send_lock``: never
    during a key exchange; the packetizer's write lock: packets of other threads never interleave
    with a batch), and written with one ``write_all``. Any other cipher goes through paramiko's
    ``Channel.send``. EOFError if the channel is closed or the connection dead."""
    t = chan.transport
    p = t.packetizer
    total = len(data)
    off = 0
    if not _aead_ready(p):
        while off < total:
            n = chan.send(data[off : off + 32768])
            if n <= 0:
                raise EOFError()
            off += n
        return
    global sealed_packets
    room = chan.out_max_packet_size - 64  # what paramiko's own path puts in one packet at most
    # this thread's buffers, reused from call to call: one packet before it is sealed, and the
    # sealed batch (a new bytes object of half a MiB for each was an mmap, page faults and a
    # copy of its own: a third of this function's time)
    bufs = _seal_buffers.__dict__
    if len(bufs.get("packet", b"")) < _DATA_HEAD.size + room + 32:
        bufs["packet"] = bytearray(_DATA_HEAD.size + room + 32)
    buf = bufs["packet"]
    view = memoryview(buf)
    out = bufs.setdefault("sealed", bytearray(0))
    out_view = memoryview(out)
    while off < total:
        sizes: list[int] = []
        with chan.lock:  # window taken as Channel._send takes it, packet by packet
            if chan.closed:
                raise EOFError()
            got = 0
            while got < SEAL_BATCH and off + got < total and (not sizes or chan.out_window_size > 0):
                n = chan._wait_for_send_window(min(room, total - off - got))
                if n <= 0:
                    break
                sizes.append(n)
                got += n
        if not sizes:
            raise EOFError()
        start = time.time()
        while True:  # as Transport._send_user_message: never while keys are being exchanged
            t.clear_to_send.wait(0.1)
            if not t.active:
                raise EOFError()
            t.clear_to_send_lock.acquire()
            if t.clear_to_send.is_set():
                break
            t.clear_to_send_lock.release()
            if time.time() > start + t.clear_to_send_timeout:
                raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")
        try:
            d = p.__dict__
            with d[_P + "write_lock"]:
                if not _aead_ready(p):  # the keys changed to another cipher: paramiko's path
                    sealed = None
                else:
                    engine, iv = d[_P + "block_engine_out"], d[_P + "iv_out"]
                    seq = d[_P + "sequence_number_out"]
                    chanid = chan.remote_chanid
                    into = getattr(engine, "encrypt_into", None) if SEAL_INTO else None
                    need = sum(sizes) + len(sizes) * (_DATA_HEAD.size + 19 + 16)  # head, padding, tag
                    if len(out) < need:
                        out_view.release()
                        out = bufs["sealed"] = bytearray(need + room)
                        out_view = memoryview(out)
                    pos = off
                    at = 0  # where the next sealed packet goes in ``out``
                    for n in sizes:
                        body = 9 + n  # CHANNEL_DATA, recipient channel, the data's length, the data
                        pad = 19 - (body + 4) % 16  # as Packetizer._build_packet: 4..19 bytes
                        end = _DATA_HEAD.size + n + pad
                        _DATA_HEAD.pack_into(buf, 0, body + pad + 1, pad, _MSG_CHANNEL_DATA, chanid, n)
                        buf[_DATA_HEAD.size : _DATA_HEAD.size + n] = data[pos : pos + n]
                        buf[_DATA_HEAD.size + n : end] = os.urandom(pad)
                        out[at : at + 4] = view[:4]  # the length: in clear, the associated data
                        sealed_end = at + end + 16  # the rest sealed, its 16-byte tag behind it
                        if into is not None:
                            into(iv, view[4:end], view[:4], out_view[at + 4 : sealed_end])
                        else:
                            out[at + 4 : sealed_end] = engine.encrypt(iv, view[4:end], view[:4])
                        at = sealed_end
                        iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
                        seq = (seq + 1) & 0xFFFFFFFF
                        pos += n
                    sealed = out_view[:at]
                    d[_P + "iv_out"] = iv
                    d[_P + "sequence_number_out"] = seq
                    p.write_all(sealed)
                    d[_P + "sent_bytes"] += at
                    d[_P + "sent_packets"] += len(sizes)
                    sealed_packets += len(sizes)
                    if (d[_P + "sent_packets"] >= p.REKEY_PACKETS or d[_P + "sent_bytes"] >= p.REKEY_BYTES) \
                            and not p.need_rekey():
                        d[_P + "received_bytes_overflow"] = 0
                        d[_P + "received_packets_overflow"] = 0
                        p._trigger_rekey()
            if sealed is None:
                pos = off
                for n in sizes:
                    m = Message()
                    m.add_byte(bytes([_MSG_CHANNEL_DATA]))
                    m.add_int(chan.remote_chanid)
                    m.add_string(bytes(data[pos : pos + n]))
                    p.send_message(m)
                    pos += n
        finally:
            t.clear_to_send_lock.release()
        off += sum(sizes)


class Connection:
    """One authenticated SSH connection with one SFTP channel, for one thread at a time."""

    def __init__(self, ep: Endpoint, transport: paramiko.Transport, sftp: SFTP, hops: list[paramiko.Transport]):
        self.endpoint = ep
        self.transport = transport
        self.sftp = sftp
        self.hops = hops
        self.broken = False
        self.dir_handles: dict[str, bytes] = {}  # directories kept open for their fsyncs (batch.Uploads)
        self.dir_cap: int | None = None  # how many it may keep (batch.dir_handles_cap, asked once)
        self.shard = (0, -1)  # (shards, shard) of the last batch spread by fan-out directory (parallel.py)

    @property
    def server_version(self) -> str:
        v = self.transport.remote_version or ""
        return v.split("-", 2)[-1].split(" ")[0] if v.startswith("SSH-") else v

    @property
    def alive(self) -> bool:
        return not self.broken and self.transport.is_active()

    def close(self) -> None:
        for closer in (self.sftp.close, self.transport.close, *(h.close for h in reversed(self.hops))):
            try:
                closer()
            except Exception:
                pass


def _parse_hop(spec: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` from ProxyJump."""
    spec = spec.strip()
    if spec.startswith("ssh://"):
        spec = spec[6:].rstrip("/")
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = int(p)
    else:
        host = spec
    return host, user, port


def _tcp(ep: Endpoint) -> socket.socket:
    sock = socket.create_connection((ep.hostname, ep.port), timeout=ep.connect_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 30x on small files
    return sock


def _transport(ep: Endpoint, sock: Any) -> paramiko.Transport:
    """Handshake, check the host key, authenticate."""
    t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET)
    try:
        opts = t.get_security_options()
        ciphers = tuple(opts.ciphers)
        opts.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in ciphers) + tuple(
            c for c in ciphers if c not in PREFERRED_CIPHERS
        )
        known = _load_host_keys(ep)
        entry = known.lookup(ep.host_key_name)
        if entry:  # ask for a key type we can check, as ssh does
            names = set(entry.keys())
            if "ssh-rsa" in names:
                names |= {"rsa-sha2-512", "rsa-sha2-256"}
            types = tuple(opts.key_types)
            opts.key_types = tuple(k for k in types if k in names) + tuple(k for k in types if k not in names)
        t.banner_timeout = ep.connect_timeout
        t.handshake_timeout = ep.connect_timeout
        t.auth_timeout = ep.connect_timeout
        t.start_client(timeout=ep.connect_timeout)
        check_host_key(ep, t.get_remote_server_key(), known)
        authenticate(t, ep)
        return t
    except BaseException:
        t.close()
        raise


def open_connection(ep: Endpoint, io_timeout: float) -> Connection:
    """Connect (directly, through ProxyCommand or ProxyJump hops) and start the SFTP subsystem.

    Raises RemoteError with one line naming the host for everything that can go wrong.
    """
    hops: list[paramiko.Transport] = []
    current = ep
    try:
        if ep.proxy_command:
            current = ep
            sock: Any = paramiko.ProxyCommand(ep.proxy_command)
        elif ep.proxy_jump:
            via: paramiko.Transport | None = None
            for spec in ep.proxy_jump.split(","):
                host, user, port = _parse_hop(spec)
                hop = resolve(host, user, port, ep.connect_timeout)
                hop.proxy_jump = None
                current = hop
                if via is None:
                    hop_sock: Any = paramiko.ProxyCommand(hop.proxy_command) if hop.proxy_command else _tcp(hop)
                else:
                    hop_sock = via.open_channel(
                        "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=ep.connect_timeout
                    )
                via = _transport(hop, hop_sock)
                hops.append(via)
            current = ep
            assert via is not None
            sock = via.open_channel(
                "direct-tcpip", (ep.hostname, ep.port), ("127.0.0.1", 0), timeout=ep.connect_timeout
            )
        else:
            sock = _tcp(ep)
        t = _transport(ep, sock)
        try:
            sftp = SFTP.from_transport(t, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET)
        except Exception as exc:
            active = t.is_active()
            t.close()
            if not active:
                raise RemoteError(f"connection to {ep.label()} lost while starting sftp; try again") from None
            raise RemoteError(
                f"{ep.label()}: the server refused the sftp subsystem ({exc or type(exc).__name__})"
            ) from None
        if sftp is None:
            active = t.is_active()
            t.close()
            if not active:
                raise RemoteError(f"connection to {ep.label()} lost while starting sftp; try again")
            raise RemoteError(f"{ep.label()}: the server refused the sftp subsystem")
        sftp.get_channel().settimeout(io_timeout)
        return Connection(ep, t, sftp, hops)
    except BaseException as exc:
        for hop in reversed(hops):
            hop.close()
        if isinstance(exc, RemoteError | UsageError):
            raise
        if isinstance(exc, Exception):
            raise connect_error(current, exc) from None
        raise


def connect_error(ep: Endpoint, exc: BaseException) -> RemoteError:
    """One line for a failure to reach or greet the server."""
    where = ep.label()
    if isinstance(exc, socket.gaierror):
        return RemoteError(f"cannot resolve host {ep.hostname!r} (for {ep.name}): {exc.strerror or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return RemoteError(f"{where} refused the connection (is sshd running on port {ep.port}?)")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return RemoteError(f"{where}: no answer within {ep.connect_timeout:g}s (timeout; host down or firewalled?)")
    if isinstance(exc, paramiko.ChannelException):
        return RemoteError(f"{where}: the jump host could not open a connection to it ({exc.text})")
    if isinstance(exc, paramiko.ProxyCommandFailure):
        return RemoteError(f"{where}: ProxyCommand failed: {exc}")
    if isinstance(exc, paramiko.SSHException):
        text = str(exc) or type(exc).__name__
        if "Error reading SSH protocol banner" in text or "No existing session" in text:
            text = "the server closed the connection during the handshake"
        return RemoteError(f"{where}: SSH handshake failed: {text}")
    if isinstance(exc, (EOFError, ConnectionError)):
        return RemoteError(f"{where}: the connection was closed during the handshake")
    if isinstance(exc, OSError):
        return RemoteError(f"{where}: cannot connect: {exc.strerror or exc}")
    return RemoteError(f"{where}: cannot connect: {type(exc).__name__}: {exc}")
