"""A throw-away one-node Slurm for tests: munged, slurmctld and slurmd on this host, every file in
a temporary folder, ports picked free so two instances cannot clash.

    with local_slurm() as env:   # env: os.environ plus SLURM_CONF=<tmp>/slurm.conf
        subprocess.run(["sbatch", ...], env=env)

Needs root (slurmd launches jobs; munged runs as the `munge` user) and the Debian packages
slurmctld, slurmd, slurm-client, munge (tests/api/install_system_deps.sh); without them the
calling test is skipped with the reason. The node is `localhost` with `num_cpus` CPUs;
accounting storage is off, so finished jobs are known to `scontrol` for MinJobAge=300 s and
`sacct` knows nothing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    """`name` on PATH, or in the sbin folders (not on a non-root PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _missing() -> str | None:
    """Why this host cannot run the test Slurm, or None."""
    absent = [b for b in BINARIES if _which(b) is None]
    if absent:
        return (f"slurm binaries not found: {', '.join(absent)} "
                "(run tests/api/install_system_deps.sh as root)")
    if os.geteuid() != 0:
        return "the test Slurm needs root (slurmd launches jobs, munged runs as user munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (install the munge package)"
    return None


def _ensure_munge_key() -> None:
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    mungekey = _which("mungekey") or "mungekey"
    subprocess.run([mungekey, "--create", f"--keyfile={MUNGE_KEY}"], check=True, timeout=30)
    munge = pwd.getpwnam("munge")
    os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)


def slurm_conf(root: Path, num_cpus: int, ctld_port: int, slurmd_port: int) -> str:
    socket_path = root / "munge" / "munge.socket"
    return "\n".join([
        "ClusterName=foldplantest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={socket_path}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MinJobAge=300",
        "KillWait=5",
        "SchedulerType=sched/builtin",
        f"NodeName=localhost CPUs={num_cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _log_tails(root: Path) -> str:
    out = []
    for name in ("munged.log", "munge/munged.log", "slurmctld.out", "slurmctld.log",
                 "slurmd.out", "slurmd.log"):
        path = root / name
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {name}\n" + "\n".join(lines))
    return "\n".join(out)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_GRACE_S)


def _wait_idle(env: dict[str, str], procs: list[subprocess.Popen], root: Path) -> None:
    """Until sinfo reports the node idle; RuntimeError with the daemons' logs otherwise."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while starting the test Slurm\n{_log_tails(root)}")
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                           text=True, timeout=10, check=False)
        state = r.stdout.strip()
        if r.returncode == 0 and state == "idle":
            return
        time.sleep(0.3)
    raise RuntimeError(f"test Slurm node not idle after {READY_TIMEOUT_S:.0f} s "
                       f"(sinfo: {state!r})\n{_log_tails(root)}")


def _spawn(argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A daemon in the foreground, its output appended to `log`."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kwargs)


@contextmanager
def local_slurm(num_cpus: int = 2) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd; yield os.environ plus SLURM_CONF; stop them all.

    Skips the calling test (pytest.skip) when the binaries or root are missing."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    _ensure_munge_key()
    # Not under pytest's tmp_path: that folder is 0700 root and munged runs as user munge.
    root = Path(tempfile.mkdtemp(prefix="foldplan-slurm-"))
    procs: list[subprocess.Popen] = []
    try:
        os.chmod(root, 0o755)
        munge = pwd.getpwnam("munge")
        munge_dir = root / "munge"
        munge_dir.mkdir(mode=0o755)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        for sub in ("state", "spool"):
            (root / sub).mkdir(mode=0o755)
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, num_cpus, _free_port(), _free_port()))
        env = {**os.environ, "SLURM_CONF": str(conf)}

        procs.append(_spawn(
            [_which("munged"), "--foreground", f"--socket={munge_dir / 'munge.socket'}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}", f"--key-file={MUNGE_KEY}"],
            root / "munged.log", user="munge", group="munge"))
        deadline = time.monotonic() + 10
        while not (munge_dir / "munge.socket").exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{_log_tails(root)}")
            time.sleep(0.05)
        procs.append(_spawn([_which("slurmctld"), "-D", "-i", "-f", str(conf)],
                            root / "slurmctld.out", env=env))
        procs.append(_spawn([_which("slurmd"), "-D", "-f", str(conf)], root / "slurmd.out",
                            env=env))
        _wait_idle(env, procs, root)
        yield env
    finally:
        for proc in reversed(procs):  # slurmd, slurmctld, then munged
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
