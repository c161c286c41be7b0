"""How many CPUs this process may use: the CPUs it may run on (its affinity, as
``taskset`` or a cpuset sets it) or its cgroup's CPU quota (a container's CPU limit),
whichever is smaller. ``os.cpu_count()`` reports the host's, which a container limited
to one CPU on a 16-core node does not get.

Read once, when the store opens (``SQLITE_WRITER=auto`` chooses the writer by it).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float:
    cpus = float(len(os.sched_getaffinity(0)))
    quota = cgroup_quota(root, proc_cgroup)
    return cpus if quota is None else min(cpus, quota)


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of the quota, or None if there is none (or none can be read).

    cgroup v2: the smallest ``cpu.max`` from this process's cgroup up to the root (a
    parent's limit binds its children). cgroup v1: ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` of the cpu controller's mount, which is the container's own
    cgroup inside a container.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = [q for q in (_v2_quota(root, lines), _v1_quota(root)) if q is not None]
    return min(quotas) if quotas else None


def _v2_quota(root: Path, lines: list[str]) -> float | None:
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        return None
    quotas = []
    folder = Path(own)
    while True:
        quota = _ratio(root / folder.relative_to("/") / "cpu.max")
        if quota is not None:
            quotas.append(quota)
        if folder == folder.parent:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def _ratio(cpu_max: Path) -> float | None:
    """``cpu.max`` holds "$MAX $PERIOD", with "max" for no limit."""
    try:
        limit, period = cpu_max.read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(root: Path) -> float | None:
    for controller in ("cpu", "cpu,cpuacct"):
        folder = root / controller
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None
