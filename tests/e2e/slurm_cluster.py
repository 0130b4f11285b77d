"""A real one-node Slurm cluster on localhost, for the end-to-end Slurm tests.

``SlurmCluster(root).start()`` installs Slurm and munge with apt if they are missing (root only),
writes a minimal ``slurm.conf`` (one node with this machine's CPUs, proctrack/linuxproc, no
cgroups, select/cons_tres, JobRequeue=1, every state/spool/log file under ``root``), starts
``munged``, ``slurmctld`` and ``slurmd`` in the foreground as our own child processes and waits
until ``sinfo`` shows the node idle. Nothing under ``/etc`` is touched: the client commands find the
cluster through ``SLURM_CONF`` (``cluster.env``), munge through ``AuthInfo=socket=...``.

``stop()`` cancels every job, waits for the job steps to end, then stops the daemons it started
(by pid) and any ``slurmstepd`` they left behind. Debug by hand with::

    python -m tests.e2e.slurm_cluster /tmp/slurm-debug     # starts, prints the env, waits for Ctrl-C
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

from mod_train.distributed.world import free_port

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or run here (no root, no apt); the message is the skip reason."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but the cluster did not come up: a failure, not a reason to skip."""


def _missing_binaries() -> List[str]:
    return [b for b in (*SLURM_BINARIES, "munged") if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def ensure_installed(timeout: float = 600) -> None:
    """apt-get install slurm-wlm + munge if any binary is missing (root only), else SlurmUnavailable."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(_missing_binaries())} missing) and installing "
                               f"it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmds = [["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]]
    # The package lists may be missing on a fresh image: update once, then retry.
    for attempt in range(2):
        r = subprocess.run(cmds[0], capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode == 0:
            break
        if attempt == 0:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=timeout)
    else:
        raise SlurmUnavailable(f"`apt-get install slurm-wlm munge` failed: {(r.stderr or r.stdout)[-500:]}")
    if _missing_binaries():
        raise SlurmUnavailable(f"installed slurm-wlm but {', '.join(_missing_binaries())} still missing")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def node_hardware() -> Dict[str, str]:
    """This machine as slurmd sees it (``slurmd -C``): NodeName, CPUs, sockets, cores, RealMemory..."""
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
    line = next((l for l in out.splitlines() if l.startswith("NodeName=")), "")
    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    if "CPUs" not in fields:
        raise SlurmStartError(f"`slurmd -C` did not describe this node: {out!r}")
    return fields


class SlurmCluster:
    """One node, one partition (``debug``), daemons run as children of this process."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.t0 = time.time()
        self.node = ""
        self.cpus = 0

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> Dict[str, str]:
        """os.environ plus SLURM_CONF: what every client command (and job) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{self.log_tail()}")
        return r

    # ------------------------------------------------------------------ config
    def write_config(self) -> None:
        hw = node_hardware()
        self.node, self.cpus = hw["NodeName"], int(hw["CPUs"])
        for d in ("etc", "state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        node_hw = " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                    "ThreadsPerCore") if k in hw)
        mem = int(hw.get("RealMemory", "1024"))
        self.conf.write_text(f"""\
# Generated by tests/e2e/slurm_cluster.py: a one-node test cluster, state under {r}
ClusterName=modtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job (begin time = requeue + cred_expire + 1 s; default 120 s).
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through their parent chain.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` (no accounting database here).
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 {node_hw} RealMemory={mem} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: List[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, cwd=self.root)
        log.close()

    def start(self, timeout: float = 90) -> "SlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("running a private Slurm cluster (slurmd, SlurmUser=root) needs root")
        self.write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        # --force: the key and socket live under a world-writable /tmp, which munged otherwise refuses.
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: (m / "munge.socket").exists(), 20, "munged did not create its socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0 and
                       "UP" in self.run("scontrol", "ping", check=False).stdout, 30, "slurmctld did not come up")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "the node did not become idle")
        return self

    def _node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise SlurmStartError(f"{name} exited with code {p.returncode}: {self.log_tail()}")
        r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    return
            except SlurmStartError:
                self.stop()
                raise
            except Exception:
                pass
            time.sleep(0.3)
        self.stop()
        raise SlurmStartError(f"{what} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        parts = []
        for f in ("slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout", "slurmd.stdout"):
            p = self.root / "log" / f
            if p.is_file() and p.stat().st_size:
                parts.append(f"--- {f}:\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs
    def job_info(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} if unknown."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        first = r.stdout.splitlines()[0] if r.stdout.strip() else ""
        return dict(kv.split("=", 1) for kv in re.findall(r"(\S+=\S*)", first))

    def array_states(self, job_id: str) -> List[str]:
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return re.findall(r"JobState=(\S+)", r.stdout)

    def wait_jobs(self, job_ids: List[str], timeout: float, poll: float = 1.0) -> Dict[str, List[str]]:
        """Poll until every job (every task of an array) is in a final state; their states."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.time() + timeout
        states: Dict[str, List[str]] = {}
        while time.time() < deadline:
            states = {j: self.array_states(j) for j in job_ids}
            if all(s and all(x in final for x in s) for s in states.values()):
                return states
            # A dependency that can never be satisfied leaves the job pending forever.
            for j in job_ids:
                if "DependencyNeverSatisfied" in self.job_info(j).get("Reason", ""):
                    return states
            time.sleep(poll)
        raise TimeoutError(f"jobs {job_ids} not finished after {timeout:.0f} s: {states}\n"
                           f"{self.run('squeue', check=False).stdout}")

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Cancel all jobs, wait for their processes, stop the daemons we started, reap strays."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            deadline = time.time() + 45
            while time.time() < deadline:
                r = self.run("squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING", check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._reap_strays()
        self.procs.clear()

    def _reap_strays(self) -> None:
        """slurmstepd (and its job processes) started by our slurmd after t0 and still alive."""
        try:
            import psutil
        except ImportError:
            return
        strays = []
        for p in psutil.process_iter(["name", "create_time", "cmdline"]):
            try:
                if p.info["create_time"] >= self.t0 - 1 and (p.info["name"] or "").startswith("slurmstepd"):
                    strays += p.children(recursive=True) + [p]
            except psutil.Error:
                pass
        from tests.helpers_train import kill_processes

        kill_processes(strays)


def main() -> None:
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-debug")
    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    c = SlurmCluster(root).start()
    print(f"export SLURM_CONF={c.conf}\n(Ctrl-C or SIGTERM stops the cluster)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    main()
