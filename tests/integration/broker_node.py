"""A throwaway RabbitMQ node for tests: own node name, ports, data dir, config and epmd.

    with BrokerNode() as node:
        url = node.start()                     # amqp://guest:guest@127.0.0.1:<port>/%2F
        ...
        node.restart()                         # same node, ports and data dir
    # stopped (even after a failure inside the block) and its directory deleted

Isolation from the shared broker (RABBITMQ_NOTES.md section 2): the node gets its own name
(`helora-<hex>@localhost`), AMQP/TLS/distribution ports, mnesia/log/pid directories, config file
(RABBITMQ_CONFIG_FILE), enabled-plugins file and rabbitmq-env.conf (the system one pins
NODENAME). It also gets its OWN epmd on its own port (ERL_EPMD_PORT): the node never touches the
system epmd on 4369, and stopping kills exactly the epmd this helper started, by PID, so nothing
is left behind. Every rabbitmqctl call for the node must carry the same ERL_EPMD_PORT: use
``node.ctl(...)`` (or ``node.ctl_env()`` with ``-n node.node_name``).

Timing (2-core machine, RabbitMQ 3.10; idle machine / load average 10 from parallel runs):
start 3.5-5.5 s / 6-12 s (the first start of a data dir is the slowest; about the same with the
management plugin); graceful stop 3.4-3.7 s (about 9 s with the management plugin); hard stop
(SIGKILL) under 0.1 s; restart 8 s / 13 s graceful, 4 s / 9 s hard. ``restart()`` keeps the data
directory (durable queues and persistent messages survive, after a hard kill too: checked for
classic and quorum queues), the node name, every port and the epmd. It returns only once the
node accepts AMQP connections again; clients reconnecting in a retry loop meanwhile get
refused connections, never a half-started broker. Budget 30 s per restart in a test timeout.

Cleanup: ``stop()``/``close()`` also kill, by PID, any process that carries this node's unique
name in its environment (a half-started VM, or an ``epmd -daemon`` that an Erlang VM starts on
its own when it finds no epmd on ERL_EPMD_PORT), so a failed start leaves nothing behind. Only
a SIGKILL of the test process itself (no atexit) can leak the node and its epmd.

Requirements: rabbitmq-server, rabbitmqctl and epmd on PATH, and root or the rabbitmq user (the
Debian wrappers switch to the rabbitmq user, which must own the data directory).
``BrokerNode.unavailable_reason()`` says why a node cannot start here (tests skip with it).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

GUEST = "guest:guest"
DIST_ON_LOOPBACK = "-kernel inet_dist_use_interface {127,0,0,1}"


class BrokerNodeError(RuntimeError):
    """The throwaway node did not start (the message carries the tail of its log)."""


@dataclass(frozen=True)
class TlsListener:
    """Server side TLS: PEM files (copied into the node's directory, so any location works)."""

    cacertfile: Path
    certfile: Path
    keyfile: Path
    verify_peer: bool = True
    fail_if_no_peer_cert: bool = True


def free_port(low: int = 20000, high: int = 50000) -> int:
    """A TCP port free on 127.0.0.1 right now, below ``high`` so that the CLI's distribution
    range (dist port + 10000 .. +10010) stays valid."""
    for _ in range(200):
        port = int.from_bytes(os.urandom(2), "big") % (high - low) + low
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BrokerNodeError("no free port found")


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class BrokerNode:
    """One throwaway RabbitMQ node. ``start``/``stop``/``restart``; a context manager that
    stops the node and deletes its directory on exit."""

    def __init__(self, base_dir: Path | None = None, *, startup_timeout: float = 90.0) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="helora-node-", dir="/tmp"))
        self._own_base = base_dir is None
        self.node_name = f"helora-{uuid.uuid4().hex[:10]}@localhost"
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.tls_port: int | None = None
        self.management_port: int | None = None
        self.dist_port: int | None = None
        self.epmd_port: int | None = None
        self.pid: int | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._tls: TlsListener | None = None
        self._management = False
        self._extra_config = ""
        self.timings: dict[str, float] = {}
        atexit.register(self._atexit)

    # ---- environment ----

    @staticmethod
    def unavailable_reason() -> str | None:
        """None if a throwaway node can be started here, else why not."""
        for tool in ("rabbitmq-server", "rabbitmqctl", "epmd"):
            if shutil.which(tool) is None:
                return f"{tool} is not on PATH (install rabbitmq-server)"
        try:
            rabbit = pwd.getpwnam("rabbitmq")
        except KeyError:
            return "there is no 'rabbitmq' system user"
        if os.geteuid() not in (0, rabbit.pw_uid):
            return "a throwaway RabbitMQ node needs root or the rabbitmq user (Debian wrappers)"
        return None

    def ctl_env(self) -> dict[str, str]:
        """Environment for rabbitmqctl/rabbitmq-server aimed at this node (own epmd port)."""
        env = dict(os.environ)
        env.update(
            {
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "ERL_EPMD_PORT": str(self.epmd_port),
            }
        )
        return env

    def ctl(
        self, *args: str, input: bytes | None = None, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``rabbitmqctl -n <this node> ARGS``."""
        proc = subprocess.run(
            ["rabbitmqctl", "-n", self.node_name, *args],
            input=input,
            capture_output=True,
            env=self.ctl_env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmqctl {args[0] if args else ''} failed (rc={proc.returncode}): "
                f"{proc.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return proc

    @property
    def url(self) -> str:
        return f"amqp://{GUEST}@127.0.0.1:{self.port}/%2F"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise BrokerNodeError("the node has no TLS listener")
        return f"amqps://{GUEST}@127.0.0.1:{self.tls_port}/%2F"

    @property
    def management_url(self) -> str:
        if self.management_port is None:
            raise BrokerNodeError("the node was started without the management plugin")
        return f"http://{GUEST}@127.0.0.1:{self.management_port}"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.node_name}.log"

    # ---- lifecycle ----

    def start(
        self,
        port: int | None = None,
        tls: TlsListener | None = None,
        *,
        management: bool = False,
        extra_config: str = "",
    ) -> str:
        """Start the node and wait until it accepts AMQP; returns the plain amqp:// URL.

        ``port`` (default: a free one) is the plain AMQP port; with ``tls`` a TLS listener is
        added on another free port (``tls_port``/``tls_url``); ``management`` enables the
        management plugin (``management_url``). ``extra_config`` lines are appended to
        rabbitmq.conf. Starting again after ``stop()`` reuses the data directory and the ports
        (a broker that was down for a while); ``restart()`` does both in one call."""
        reason = self.unavailable_reason()
        if reason:
            raise BrokerNodeError(reason)
        if self.pid is not None and _alive(self.pid):
            raise BrokerNodeError(f"{self.node_name} is already running")
        # a second start() (after stop()) keeps the ports, so URLs stay valid, like restart()
        self.port = port or self.port or free_port()
        self.dist_port = self.dist_port or free_port(20000, 45000)
        self.epmd_port = self.epmd_port or free_port()
        self.tls_port = (self.tls_port or free_port()) if tls else None
        self.management_port = (self.management_port or free_port()) if management else None
        self._tls, self._management, self._extra_config = tls, management, extra_config
        self._check_reachable()
        self._write_files()
        return self._boot()

    def restart(self, *, hard: bool = False) -> str:
        """Stop and start again: same node name, ports, data dir (durable queues and persistent
        messages survive) and epmd. Returns the plain amqp:// URL once the node accepts
        connections again (8-13 s here, 4-9 s with ``hard``; see the module docstring).

        ``hard=True`` kills the node with SIGKILL instead of a graceful stop: a broker crash.
        Quorum queues and streams fsync before confirming, so confirmed messages survive it."""
        if self.port is None:
            raise BrokerNodeError("restart() before start()")
        t0 = time.monotonic()
        self._stop_node(hard=hard)
        self._sweep()
        self._boot()
        self.timings["restart"] = time.monotonic() - t0
        return self.url

    def stop(self, *, hard: bool = False) -> None:
        """Stop the node and the epmd this helper started. Idempotent. Graceful (rabbitmqctl
        stop, about 3.5 s; about 9 s with the management plugin), then SIGTERM/SIGKILL by PID
        if it is still alive; ``hard=True`` sends SIGKILL at once (a crash, instant)."""
        t0 = time.monotonic()
        try:
            self._stop_node(hard=hard)
        finally:
            self._stop_epmd()
            self._sweep()
        self.timings["stop"] = time.monotonic() - t0

    def close(self) -> None:
        """Stop, then delete the node's directory (if this helper created it). The data is
        about to be deleted, so the node is killed rather than stopped gracefully: teardown is
        instant and cannot hang."""
        try:
            self.stop(hard=self._own_base)
        finally:
            if self._own_base:
                shutil.rmtree(self.base, ignore_errors=True)
            atexit.unregister(self._atexit)

    def __enter__(self) -> BrokerNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----

    def _write_files(self) -> None:
        for sub in ("mnesia", "log", "tls"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users.guest = true",
            "log.file.level = info",
            "log.console = false",
        ]
        if self._tls:
            tls_dir = self.base / "tls"
            names = {"cacertfile": "ca.pem", "certfile": "server.pem", "keyfile": "server.key"}
            for field, name in names.items():
                shutil.copyfile(getattr(self._tls, field), tls_dir / name)
                conf.append(f"ssl_options.{field} = {tls_dir / name}")
            (tls_dir / "server.key").chmod(0o600)
            verify = "verify_peer" if self._tls.verify_peer else "verify_none"
            conf += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.verify = {verify}",
                f"ssl_options.fail_if_no_peer_cert = {str(self._tls.fail_if_no_peer_cert).lower()}",
            ]
        if self._management:
            conf += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
        if self._extra_config:
            conf.append(self._extra_config.strip())
        (self.base / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        plugins = "[rabbitmq_management]." if self._management else "[]."
        (self.base / "enabled_plugins").write_text(plugins + "\n")
        (self.base / "rabbitmq-env.conf").write_text(
            "# own env file: the system one pins NODENAME\n"
        )
        self._chown()

    def _chown(self) -> None:
        if os.geteuid() != 0:
            return
        rabbit = pwd.getpwnam("rabbitmq")
        os.chown(self.base, rabbit.pw_uid, rabbit.pw_gid)
        for root, dirs, files in os.walk(self.base):
            for name in dirs + files:
                os.chown(os.path.join(root, name), rabbit.pw_uid, rabbit.pw_gid)

    def _server_env(self) -> dict[str, str]:
        env = self.ctl_env()
        env.update(
            {
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
                # distribution on loopback only (the default listens on every interface)
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": DIST_ON_LOOPBACK,
            }
        )
        return env

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        epmd = shutil.which("epmd")
        assert epmd is not None
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.epmd_port or 0, 0.2):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise BrokerNodeError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)

    def _stop_epmd(self) -> None:
        proc, self._epmd = self._epmd, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _boot(self) -> str:
        t0 = time.monotonic()
        pid_file = self.base / "node.pid"
        pid_file.unlink(missing_ok=True)
        self._start_epmd()
        env = self._server_env()
        try:
            subprocess.run(
                ["rabbitmq-server", "-detached"], env=env, capture_output=True, timeout=60
            )
            wait = subprocess.run(
                ["rabbitmqctl", "-n", self.node_name, "wait", str(pid_file)]
                + ["--timeout", str(int(self.startup_timeout))],
                env=env,
                capture_output=True,
                timeout=self.startup_timeout + 30,
            )
            if pid_file.exists():
                self.pid = int(pid_file.read_text().strip() or 0) or None
            if wait.returncode != 0:
                raise BrokerNodeError(
                    f"{self.node_name} did not start (rc={wait.returncode}): "
                    f"{wait.stderr.decode(errors='replace').strip()[-1000:]}\n{self._log_tail()}"
                )
            for port in (self.port, self.tls_port, self.management_port):
                if port is not None and not self._await_port(port, 30):
                    raise BrokerNodeError(f"port {port} is not listening\n{self._log_tail()}")
        except BaseException:
            self._kill_node()
            self._stop_epmd()
            self._sweep()  # e.g. a half-started VM that would start an epmd daemon of its own
            raise
        self.timings["start"] = time.monotonic() - t0
        return self.url

    def _await_port(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(port):
                return True
            time.sleep(0.1)
        return False

    def _stop_node(self, *, hard: bool = False) -> None:
        """Graceful stop (waits for the OS process to exit), then SIGTERM/SIGKILL by PID."""
        pid = self.pid
        if pid is None:
            pid_file = self.base / "node.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().strip() or 0) or None
        if pid is None or not _alive(pid):
            self.pid = None
            return
        self.pid = pid
        if hard:
            self._kill_node(signal.SIGKILL)
            return
        try:
            self.ctl("stop", str(self.base / "node.pid"), timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        self._kill_node()

    def _kill_node(self, first: signal.Signals | None = None) -> None:
        """Wait briefly for the node's OS process to exit, then SIGTERM, then SIGKILL."""
        pid = self.pid
        if pid is None:
            return
        steps = [(None, 2.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)]
        if first is signal.SIGKILL:
            steps = [(signal.SIGKILL, 10.0)]
        for sig, grace in steps:
            if sig is not None and _alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
            deadline = time.monotonic() + grace
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid):
                break
        self.pid = None

    def _check_reachable(self) -> None:
        """The rabbitmq user must be able to reach the base directory: pytest's tmp_path lives
        under a 0700 directory of root, where the node would fail to boot after a long wait."""
        if os.geteuid() != 0:
            return
        rabbit = pwd.getpwnam("rabbitmq")
        for parent in self.base.resolve().parents:
            st = parent.stat()
            if not (
                st.st_mode & stat.S_IXOTH
                or (st.st_uid == rabbit.pw_uid and st.st_mode & stat.S_IXUSR)
                or (st.st_gid == rabbit.pw_gid and st.st_mode & stat.S_IXGRP)
            ):
                raise BrokerNodeError(
                    f"the rabbitmq user cannot reach {self.base} ({parent} is "
                    f"{stat.filemode(st.st_mode)}): use BrokerNode() without base_dir (it makes "
                    "its own directory in /tmp) or a directory under a traversable parent"
                )

    def _node_processes(self) -> list[int]:
        """PIDs of every process started for this node: they carry its unique node name in
        their environment (the VM, its helpers, an epmd daemon a VM may have started itself)."""
        marker = f"RABBITMQ_NODENAME={self.node_name}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _sweep(self) -> None:
        """Kill (by PID) any process of this node that is still alive; normally there is none."""
        pids = self._node_processes()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_file})"
        return "\n".join(text[-lines:])

    def _atexit(self) -> None:
        try:
            self.stop()
        except Exception:  # interpreter shutdown: best effort only
            pass
