"""A real local Redis Cluster for the tests: 3 masters + 3 replicas on free ports.

Six `redis-server --cluster-enabled yes` in a private temp directory, joined by
`redis-cli --cluster create --cluster-replicas 1`; `start()` returns once every node says
`cluster_state:ok` and agrees on the slot map. `kill_master_of(key)` SIGKILLs the master
serving a key and waits for its replica's promotion; `restart(node)` brings a killed node
back (it rejoins as a replica of its promoted replica).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support.harness import Service, free_port, wait_until

#: Small enough that a failover takes ~2-3 s, large enough not to flap on a busy machine.
NODE_TIMEOUT_MS = 1500


class ClusterNode(Service):
    def __init__(self, workdir: Path, port: int, password: str | None = None) -> None:
        super().__init__(f"redis-{port}", workdir)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.bus_port = free_port()  # not port + 10000: that may be past 65535
        self.password = password

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        config = []
        if self.password:  # in a config file of the private temp dir, not on argv
            path = self.workdir / "auth.conf"
            path.write_text(f'requirepass "{self.password}"\nmasterauth "{self.password}"\n')
            path.chmod(0o600)
            config = [str(path)]
        self._spawn([binary, *config, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                     "--cluster-config-file", str(self.workdir / f"nodes-{self.port}.conf"),
                     "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                     "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                     "--dbfilename", f"dump-{self.port}.rdb",
                     "--repl-diskless-sync-delay", "0",  # replicas in sync at once ...
                     # ... and listed by CLUSTER SLOTS soon (once their offset is not 0)
                     "--repl-ping-replica-period", "1",
                     "--enable-debug-command", "local"])
        wait_until(self._answers, what=f"redis-server :{self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=1)


class RedisCluster:
    """Six nodes (3 masters, 3 replicas), torn down together; with `password`, every node
    requires it (requirepass, masterauth)."""

    def __init__(self, size: int = 6, password: str | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tf-cluster-"))
        self.password = password
        self.nodes = [ClusterNode(self.workdir, free_port(), password) for _ in range(size)]
        self.frozen: set[int] = set()  # ports of SIGSTOPped nodes

    @property
    def seed(self) -> ClusterNode:
        return self.nodes[0]

    @property
    def url(self) -> str:
        """REDIS_URL naming one seed node."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.seed.address}/0"

    def start(self) -> RedisCluster:
        try:
            self._start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(n.address for n in self.nodes), "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60,
                       env={**os.environ,
                            **({"REDISCLI_AUTH": self.password} if self.password else {})})
        self.wait_ok()

    def running(self) -> list[ClusterNode]:
        """Nodes alive and answering (not killed, not frozen)."""
        return [n for n in self.nodes if n.running() and n.port not in self.frozen]

    def wait_ok(self, timeout: float = 30) -> None:
        """Every running node reports cluster_state:ok and the same masters for all
        16384 slots, and every running node is listed (a replica is, once in sync)."""
        def converged() -> bool:
            running = self.running()
            try:
                maps = {tuple(sorted(self.slot_owners(n).items())) for n in running}
                states = {n.client().cluster("info")["cluster_state"] for n in running}
                listed = {int(node[1]) for _s, _e, *nodes in running[0].client()
                          .execute_command("CLUSTER SLOTS") for node in nodes}
            except (redis.RedisError, KeyError):
                return False
            return states == {"ok"} and len(maps) == 1 and listed == {n.port for n in running}
        wait_until(converged, timeout=timeout, what="cluster_state:ok on every node")

    @staticmethod
    def slot_owners(node: ClusterNode) -> dict[int, int]:
        """slot range start -> port of its master, as `node` sees it."""
        owners = {}
        for start, _end, master, *_replicas in node.client().execute_command("CLUSTER SLOTS"):
            owners[int(start)] = int(master[1])
        return owners

    def owner_of_slot(self, slot: int, node: ClusterNode) -> int | None:
        """The port of the master serving `slot`, as `node` sees it."""
        for start, end, master, *_ in node.client().execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        return None

    def masters(self) -> list[ClusterNode]:
        ports = set(self.slot_owners(self.running()[0]).values())
        return [n for n in self.nodes if n.port in ports and n.running()]

    def master_of(self, key: str) -> ClusterNode:
        slot = key_slot(key.encode())
        for start, end, master, *_ in self.running()[0].client().execute_command(
                "CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise LookupError(f"no master serves slot {slot}")

    def node_id(self, node: ClusterNode) -> str:
        return node.client().execute_command("CLUSTER MYID").decode()

    def kill(self, node: ClusterNode) -> None:
        node.kill()

    def kill_master_of(self, key: str, wait: bool = True) -> ClusterNode:
        """SIGKILL the master serving `key`; with `wait`, until its replica serves it."""
        victim = self.master_of(key)
        victim.kill()
        if wait:
            self.wait_promoted(key, victim)
        return victim

    def wait_promoted(self, key: str, victim: ClusterNode, timeout: float = 30) -> None:
        def promoted() -> bool:
            try:
                return self.master_of(key) is not victim
            except (redis.RedisError, LookupError):
                return False
        wait_until(promoted, timeout=timeout, what="the replica's promotion")
        self.wait_ok(timeout)

    def freeze(self, node: ClusterNode) -> None:
        """SIGSTOP: the node's connections stay open and nothing answers (a host that
        died without closing them)."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        self.frozen.add(node.port)

    def thaw(self, node: ClusterNode) -> None:
        """SIGCONT, then wait until the node rejoined (as a replica if it was failed
        over meanwhile)."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        self.frozen.discard(node.port)
        self.wait_ok()

    def restart(self, node: ClusterNode) -> None:
        """A killed node comes back with its nodes.conf and rejoins as a replica."""
        node.start()
        self.wait_ok()

    def clients(self) -> list[redis.Redis]:
        return [n.client() for n in self.running()]

    def flushall(self) -> None:
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.port in self.frozen:
                node.proc.send_signal(signal.SIGCONT)  # or SIGTERM would wait forever
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(n.log_text() for n in self.nodes)
