"""Shared helpers for the benchmark scripts: ports, processes, RSS, statistics, markdown.

Every process a benchmark starts goes through ``Procs``, which stops them all by PID (SIGTERM, then
SIGKILL) when its ``with`` block ends, including on Ctrl-C and SIGTERM (see ``exit_on_sigterm``).
Every external command runs with a timeout (``run``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, and make SIGINT raise KeyboardInterrupt even when the shell
    started us with it ignored (a background job), so ``finally`` blocks (and ``Procs``) run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(cmd: Sequence[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with a mandatory timeout and captured text output."""
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from exc
    if check and res.returncode != 0:
        raise BenchError(f"exit {res.returncode}: {' '.join(cmd)}\n{(res.stderr or res.stdout)[-2000:]}")
    return res


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
    """Wait until ``host:port`` accepts a connection; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}"
                             + _log_tail(log))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listening on {host}:{port} after {timeout:.0f}s"
                                 + _log_tail(log)) from None
            time.sleep(0.05)


def _log_tail(log: Path | None, n: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-n:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(lines) if lines else ""


class Procs:
    """Starts processes and stops every one of them, by PID, when the ``with`` block ends."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: Sequence[str], **kw) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            # own session: a Ctrl-C reaches only us, and we stop the children in order
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc, log

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc) -> None:
        for _name, proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)


def start_redis(procs: Procs, port: int, name: str = "redis", extra: Sequence[str] = ()) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:port with persistence off."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(procs.workdir), *extra]
    proc, log = procs.start(name, argv)
    wait_for_port("127.0.0.1", port, 10, proc, log)
    return proc


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kb(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) in KiB."""
    return int(proc_status(pid)["VmHWM"].split()[0])


def mib(kb: float | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.1f} MiB"


def tcp_peers(pid: int, remote_port: int) -> list[int]:
    """Local ports of the established TCP connections process ``pid`` has to ``remote_port`` (/proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                # cols: sl local_address rem_address st ... inode(9); st 01 = ESTABLISHED
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == remote_port and cols[9] in inodes:
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def uses_uvloop(pid: int) -> bool:
    """True if uvloop's extension module is mapped into the process."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        return any("uvloop" in line for line in f)
    return False


class CpuWatch:
    """How much CPU the rest of the machine used while a benchmark ran (to spot a busy machine).

    ``others()`` = busy time of all CPUs (/proc/stat) minus our own: this process, its reaped children
    (redis-benchmark runs) and the live processes ``pids`` (servers we started). Approximate: softirq
    time for loopback traffic is counted for the machine but not always for a process."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.t0 = time.monotonic()
        self.busy0 = self._machine_busy()
        self.own0 = self._own() + sum(self._proc_cpu(pid) for pid in self.pids)
        self.procs0 = self._all_procs()

    @classmethod
    def _machine_busy(cls) -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / cls.TICK

    @staticmethod
    def _own() -> float:
        import resource
        r_self, r_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return r_self.ru_utime + r_self.ru_stime + r_children.ru_utime + r_children.ru_stime

    @classmethod
    def _proc_cpu(cls, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / cls.TICK  # utime, stime

    @classmethod
    def _all_procs(cls) -> dict[int, float]:
        return {int(d): cls._proc_cpu(int(d)) for d in os.listdir("/proc") if d.isdigit()}

    def top_others(self, n: int = 3) -> list[tuple[str, float]]:
        """The other processes (alive at both ends) that used the most CPU since the start."""
        mine = {os.getpid(), *self.pids}
        now = self._all_procs()
        used = sorted(((now[pid] - cpu0, pid) for pid, cpu0 in self.procs0.items()
                       if pid in now and pid not in mine), reverse=True)
        out = []
        for cpu, pid in used[:n]:
            if cpu < 1:
                break
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    name = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                name = "?"
            out.append((f"{name[:70]} (pid {pid})", cpu))
        return out

    def others(self) -> tuple[float, float]:
        """(CPU-seconds used by other processes since the start, wall seconds elapsed)."""
        ours = self._own() + sum(self._proc_cpu(pid) for pid in self.pids) - self.own0
        return max(0.0, self._machine_busy() - self.busy0 - ours), time.monotonic() - self.t0


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns left-aligned, the rest right-aligned."""
    def cell(v: object) -> str:
        return "—" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def first_line(cmd: Sequence[str]) -> str:
    if not shutil.which(cmd[0]) and not Path(cmd[0]).exists():
        return "not installed"
    try:
        res = run(cmd, timeout=10, check=False)
    except BenchError as exc:
        return str(exc)
    return ((res.stdout or res.stderr).strip().splitlines() or ["?"])[0]


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    load = "?"
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "loadavg": load,
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "redis-server": first_line(["redis-server", "--version"]),
        "redis-benchmark": first_line(["redis-benchmark", "--version"]),
    }


def git_describe() -> str:
    try:
        head = run(["git", "rev-parse", "--short", "HEAD"], timeout=10, cwd=REPO_ROOT).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--", "proxy"],
                    timeout=10, cwd=REPO_ROOT).stdout.strip()
    except BenchError:
        return "?"
    return head + (" + uncommitted changes in proxy/" if dirty else "")


def write_result(prefix: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    return path
