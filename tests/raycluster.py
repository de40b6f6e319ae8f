"""A real two-node Ray cluster on this machine for tests: `ray start --head` plus a second raylet, each its own
"machine" on a loopback address (127.0.0.2 and 127.0.0.3: Ray turns 127.0.0.1 into the host's outward address,
and a test must talk to loopback only), each with its own OWNLM_HOME (its trainer identity) in its environment.

Everything it starts is found again by its temp dir (the GCS, raylets and monitors name it on their command line)
and their descendants (Ray's agents and worker processes), and killed by PID: never `ray stop`, which would
stop every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 90


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def processes_under(marker: str) -> list[int]:
    """PIDs whose command line names `marker`, and all their descendants."""
    roots = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    roots.append(int(p.name))
            except OSError:
                continue
    kids, seen, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen and pid != os.getpid():
            seen.append(pid)
            todo.extend(kids.get(pid, []))
    return seen


class LocalCluster:
    def __init__(self, homes: dict[str, Path], extra_env: dict[str, dict] | None = None):
        self.temp = Path(tempfile.mkdtemp(prefix="ownlm-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.homes, self.extra_env = homes, extra_env or {}
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.address = f"{HEAD_IP}:{free_port(HEAD_IP)}"

    def _env(self, name: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OWNLM_", "RAY_"))}
        # Its own HOME: Ray reads ~/.ray/auth_token when it exists (another Ray user's, e.g. one made by `ray
        # get-auth-token --generate`), and with it a second raylet cannot join a head started without auth
        # (seen with Ray 2.60: "InvalidAuthToken ... RAY_AUTH_MODE is currently 'disabled'").
        home = self.temp / "home"
        home.mkdir(exist_ok=True)
        return {**env, "HOME": str(home), "OWNLM_HOME": str(self.homes[name]), **self.extra_env.get(name, {})}

    def _start(self, name: str, args: list[str]) -> None:
        common = ["--num-cpus", "1", "--temp-dir", str(self.temp), "--disable-usage-stats",
                  "--object-store-memory", str(100 * 1024 * 1024)]
        r = subprocess.run([self.ray, "start", *args, *common], env=self._env(name), capture_output=True, text=True,
                           timeout=START_TIMEOUT_S)
        if r.returncode != 0:
            raise RuntimeError(f"ray start ({name}) exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")

    def start(self, second: bool = True) -> "LocalCluster":
        """The head raylet and, with `second`, worker b."""
        try:
            self._start("head", ["--head", "--node-ip-address", HEAD_IP, "--port", self.address.rsplit(":", 1)[1],
                                 "--resources", '{"ownlm_head": 1}', "--include-dashboard=false"])
            if second:
                self._start("b", ["--address", self.address, "--node-ip-address", WORKER_IP,
                                  "--resources", '{"ownlm_worker_b": 1}'])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for _ in range(3):  # a raylet may start a worker while we kill: look again
            pids = processes_under(str(self.temp))
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
