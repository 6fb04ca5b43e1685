"""Real Redis topologies for tests, from the redis-server binary: a 3-master/3-replica cluster and a Sentinel set.

Every server binds 127.0.0.1, keeps no data on disk beyond its own temporary directory, and is killed (its whole
process group) when the context ends. Ports come from the ranges the scale tests were given (cluster 7000-7099,
sentinel 26300-26399), moved on when one is taken.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster, key_slot

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(start: int, stop: int, count: int, *, bus_offset: int = 0) -> list[int]:
    """``count`` free consecutive ports in [start, stop) (each with port + bus_offset free too)."""
    for first in range(start, stop - count + 1):
        ports = list(range(first, first + count))
        if all(_port_free(p) and (not bus_offset or _port_free(p + bus_offset)) for p in ports):
            return ports
    raise RuntimeError(f"no {count} free ports in {start}-{stop}")


def _replica_in_sync(port: int) -> bool:
    """A master, or a replica whose link to its master is up (it has the master's data)."""
    info = redis.Redis(port=port, socket_timeout=1, decode_responses=True).info("replication")
    return bool(info["role"] == "master" or info.get("master_link_status") == "up")


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached after {timeout}s")


@dataclass
class _Servers:
    """redis-server processes of one topology, by port."""

    workdir: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, port: int, *args: str, config: str | None = None) -> None:
        logfile = self.workdir / f"redis-{port}.log"
        argv = [REDIS_SERVER]
        if config is not None:
            conf = self.workdir / f"redis-{port}.conf"
            conf.write_text(config)
            argv.append(str(conf))
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        # A replica's first full sync starts at once (Redis waits 5 s by default for more replicas to join).
        argv += ["--repl-diskless-sync-delay", "0"]
        argv += ["--dir", str(self.workdir), "--logfile", str(logfile), *args]
        self.procs[port] = subprocess.Popen(argv, start_new_session=True)
        _until(lambda: redis.Redis(port=port, socket_timeout=0.5).ping(), 10, f"redis-server on {port}")

    def kill(self, port: int) -> None:
        """SIGKILL, as a crashed machine would: no goodbye to replicas, sentinels or cluster peers."""
        proc = self.procs.pop(port)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@dataclass
class LocalCluster:
    """A running Redis Cluster: ``url`` is the REDIS_URL that names it."""

    ports: list[int]
    servers: _Servers

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.alive_port(), socket_timeout=2)

    def alive_port(self) -> int:
        return next(p for p in self.ports if p in self.servers.procs)

    def master_port_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now."""
        slot = key_slot(key.encode())
        probe = redis.Redis(port=self.alive_port(), socket_timeout=2, decode_responses=True)
        for start, end, master, *_replicas in probe.execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"slot {slot} is not served")

    def kill(self, port: int) -> None:
        self.servers.kill(port)

    def migrate_slot_of(self, key: str, *, pause: float = 0.0) -> tuple[int, int]:
        """Move ``key``'s slot to another master the way ``redis-cli --cluster reshard`` does (IMPORTING/MIGRATING,
        MIGRATE key by key with ``pause`` between keys, then SETSLOT NODE everywhere); returns (from, to) ports."""
        slot = key_slot(key.encode())
        source = self.master_port_of(key)
        nodes = {port: redis.Redis(port=port, socket_timeout=5, decode_responses=True) for port in self.servers.procs}
        masters = [p for p, n in nodes.items() if n.execute_command("ROLE")[0] == "master"]
        target = next(p for p in masters if p != source)
        src_id, dst_id = nodes[source].cluster("MYID"), nodes[target].cluster("MYID")
        nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        nodes[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := nodes[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
            for moving in keys:
                nodes[source].execute_command("MIGRATE", "127.0.0.1", target, moving, 0, 5000)
                time.sleep(pause)
        for port in masters:
            nodes[port].execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return source, target

    def flush(self) -> None:
        """Empty every master (the replicas follow)."""
        for port in self.servers.procs:
            node = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
            if node.execute_command("ROLE")[0] == "master":
                node.flushall()

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every slot served by a live master, as every live node sees it, and every replica in sync."""

        def healthy() -> bool:
            for port in self.servers.procs:
                info = redis.Redis(port=port, socket_timeout=1, decode_responses=True).cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
            slots = redis.Redis(port=self.alive_port(), socket_timeout=1).execute_command("CLUSTER SLOTS")
            served = sum(
                int(end) - int(start) + 1 for start, end, master, *_ in slots if int(master[1]) in self.servers.procs
            )
            # ... and every replica has its master's data (a failover then loses nothing already written).
            return served == 16384 and all(_replica_in_sync(port) for port in self.servers.procs)

        _until(healthy, timeout, "cluster state ok")


@contextmanager
def redis_cluster(*, node_timeout_ms: int = 1000) -> Iterator[LocalCluster]:
    """Six servers (3 masters, 3 replicas) joined with ``redis-cli --cluster create``; torn down afterwards."""
    ports = free_ports(7000, 7100, 6, bus_offset=10000)
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-cluster-"))
    servers = _Servers(workdir)
    try:
        for port in ports:
            servers.start(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # A replica always may take over (its master died a moment ago), and the other masters keep
                # serving their slots while one slot range has no master.
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "no",
            )
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        cluster = LocalCluster(ports, servers)
        cluster.wait_healthy()
        yield cluster
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


SERVICE = "apimgmt"


@dataclass
class LocalSentinel:
    """A master, its replica and three sentinels watching them as service ``SERVICE``."""

    master_port: int
    replica_port: int
    sentinel_ports: list[int]
    servers: _Servers

    def url(self, db: int = 0) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{SERVICE}/{db}"

    def current_master_port(self) -> int:
        for port in self.sentinel_ports:
            if port not in self.servers.procs:
                continue
            with contextlib.suppress(redis.RedisError):
                host_port = redis.Redis(port=port, socket_timeout=1, decode_responses=True).execute_command(
                    "SENTINEL", "get-master-addr-by-name", SERVICE
                )
                return int(host_port[1])
        raise LookupError("no sentinel answered")

    def kill_master(self) -> int:
        port = self.current_master_port()
        self.servers.kill(port)
        return port

    def wait_promoted(self, old_port: int, timeout: float = 30) -> int:
        """The port of the new master once the sentinels elected it and it accepts writes."""

        def promoted() -> bool:
            port = self.current_master_port()
            if port == old_port:
                return False
            role = redis.Redis(port=port, socket_timeout=1, decode_responses=True).execute_command("ROLE")
            return bool(role[0] == "master")

        _until(promoted, timeout, "sentinel failover")
        return self.current_master_port()


@contextmanager
def redis_sentinel(*, down_after_ms: int = 1000) -> Iterator[LocalSentinel]:
    """1 master, 1 replica, 3 sentinels (quorum 2); torn down afterwards."""
    ports = free_ports(26300, 26400, 5)
    master, replica, sentinels = ports[0], ports[1], ports[2:]
    workdir = Path(tempfile.mkdtemp(prefix="apimgmt-sentinel-"))
    servers = _Servers(workdir)
    try:
        servers.start(master)
        servers.start(replica, "--replicaof", "127.0.0.1", str(master))
        for port in sentinels:
            servers.start(
                port,
                "--sentinel",
                config=(
                    f"sentinel monitor {SERVICE} 127.0.0.1 {master} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                ),
            )
        setup = LocalSentinel(master, replica, sentinels, servers)

        def watched() -> bool:
            for port in sentinels:
                info = redis.Redis(port=port, socket_timeout=1, decode_responses=True).execute_command(
                    "SENTINEL", "replicas", SERVICE
                )
                if not info:
                    return False
            return True

        _until(watched, 30, "sentinels see the replica")
        _until(lambda: _replica_in_sync(replica), 30, "replica in sync")
        yield setup
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


# -- one slot per call ------------------------------------------------------------------------------------------


def _resp_commands(payload: bytes) -> list[list[bytes]]:
    """The commands in a packed RESP request (what redis-py writes to the socket in one go)."""
    commands: list[list[bytes]] = []
    pos = 0
    while pos < len(payload):
        assert payload[pos : pos + 1] == b"*", payload[pos : pos + 20]
        end = payload.index(b"\r\n", pos)
        count = int(payload[pos + 1 : end])
        pos = end + 2
        args: list[bytes] = []
        for _ in range(count):
            end = payload.index(b"\r\n", pos)
            length = int(payload[pos + 1 : end])
            args.append(payload[end + 2 : end + 2 + length])
            pos = end + 2 + length + 2
        commands.append(args)
    return commands


# Commands that name no key (or whose "key" is not one, like PUBLISH's channel).
_KEYLESS = {b"PING", b"MULTI", b"EXEC", b"DISCARD", b"SCRIPT", b"CLIENT", b"HELLO", b"SELECT", b"INFO", b"AUTH"}
_KEYLESS |= {b"READONLY", b"CLUSTER", b"COMMAND", b"FLUSHDB", b"TIME", b"ASKING", b"PUBLISH", b"SENTINEL", b"ROLE"}


@dataclass
class SlotChecker:
    """Records the keys of every write redis-py sends, and each one that spans more than one cluster slot."""

    getkeys: redis.Redis
    writes: int = 0
    multi_key_writes: int = 0
    commands: list[str] = field(default_factory=list)
    violations: list[list[str]] = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)  # .inside: asking COMMAND GETKEYS

    def keys_of(self, args: list[bytes]) -> list[bytes]:
        name = args[0].upper()
        if name in _KEYLESS:
            return []
        if name in (b"EVALSHA", b"EVAL"):
            return args[3 : 3 + int(args[2])]
        self.local.inside = True
        try:
            found = self.getkeys.execute_command("COMMAND GETKEYS", *args)
            return [k if isinstance(k, bytes) else str(k).encode() for k in found]
        except redis.ResponseError:
            return []
        finally:
            self.local.inside = False

    def observe(self, payload: bytes) -> None:
        commands = _resp_commands(payload)
        keys = [key for args in commands for key in self.keys_of(args)]
        self.writes += 1
        self.commands.extend(args[0].decode().upper() for args in commands)
        if len(keys) > 1:
            self.multi_key_writes += 1
        if len({key_slot(key) for key in keys}) > 1:
            self.violations.append([key.decode(errors="replace") for key in keys])


@contextmanager
def one_slot_per_call(port: int = 6379, db: int = 0) -> Iterator[SlotChecker]:
    """Check every write on every redis-py connection of this process (scripts, pipelines, MULTI, single commands):
    the keys one write carries must lie in one cluster slot, as Redis Cluster would demand."""
    from redis.connection import AbstractConnection

    checker = SlotChecker(redis.Redis(port=port, db=db, socket_timeout=2))
    original = AbstractConnection.send_packed_command

    def checking(self: AbstractConnection, command: object, check_health: bool = True) -> None:
        if not getattr(checker.local, "inside", False):
            parts = command if isinstance(command, list) else [command]
            checker.observe(b"".join(bytes(part) for part in parts))
        original(self, command, check_health)  # type: ignore[arg-type]

    AbstractConnection.send_packed_command = checking  # type: ignore[method-assign]
    try:
        yield checker
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
