"""How many CPUs this process may use: the CPUs it may run on (its affinity, as
``taskset`` or a cpuset sets it) or its cgroup's CPU quota (a container's CPU limit),
whichever is smaller. ``os.cpu_count()`` reports the host's, which a container limited
to one CPU on a 16-core node does not get.

Read once, when the store opens (``SQLITE_WRITER=auto`` chooses the writer by it). It
never raises: what cannot be read (no /proc, a malformed file, another OS) is no limit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller, by distribution.
_V1_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cpus = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    quota = cgroup_quota(root, proc_cgroup)
    return cpus if quota is None else min(cpus, quota)


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of the tightest quota on this process, or None if there is none.

    cgroup v2: ``cpu.max`` of this process's cgroup and of each parent up to the root (a
    parent's limit binds its children). cgroup v1: ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``, the same way down the cpu controller's tree, and at the
    controller's mount itself, which inside a container is the container's own cgroup
    (its path in /proc/self/cgroup names the host's tree, not found there).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, own = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            quotas += _up_the_tree(root, own, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in _V1_MOUNTS:
                quotas += _up_the_tree(root / mount, own, _v1_quota)
    for mount in _V1_MOUNTS:  # also without /proc
        quota = _v1_quota(root / mount)
        if quota is not None:
            quotas.append(quota)
    return min(quotas) if quotas else None


def _up_the_tree(base: Path, own: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas ``read`` finds in the cgroup ``own`` (an absolute path under ``base``)
    and in each of its parents."""
    folder = PurePosixPath(own)
    if not folder.is_absolute():
        return []  # malformed: no cgroup path
    quotas = []
    while True:
        quota = read(base.joinpath(*folder.parts[1:]))
        if quota is not None:
            quotas.append(quota)
        if folder == folder.parent:
            return quotas
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    """``cpu.max`` holds "$MAX $PERIOD", with "max" for no limit."""
    try:
        limit, period = (folder / "cpu.max").read_text().split()
        return None if limit == "max" else _ratio(int(limit), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 for no limit."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
