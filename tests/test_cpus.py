"""How many CPUs the service may use (app/cpus.py), and the SQLite writer it therefore
gets with SQLITE_WRITER=auto: a process with two CPUs or more, else a thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.cpus import available_cpus, cgroup_quota
from app.store.sqlite import choose_writer
from app.store.sqlite_writer import ProcessWriter
from app.store.writer_thread import ThreadWriter


def _cgroup_v2(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree: this process in ``own``, ``cpu.max`` where ``limits`` says."""
    root = tmp_path / "cgroup"
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    for folder, cpu_max in limits.items():
        (root / folder.strip("/")).mkdir(parents=True, exist_ok=True)
        (root / folder.strip("/") / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_a_v2_limit_of_this_cgroup_or_a_parent_binds(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"/kubepods/pod1/ctr": "max 100000", "/kubepods/pod1": "150000 100000"},
    )
    assert cgroup_quota(root, proc) == 1.5
    root, proc = _cgroup_v2(tmp_path / "b", "/ctr", {"/ctr": "50000 100000", "/": "max 100000"})
    assert cgroup_quota(root, proc) == 0.5


def test_no_limit_anywhere_is_no_quota(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, "/ctr", {"/ctr": "max 100000"})
    assert cgroup_quota(root, proc) is None
    assert cgroup_quota(root, tmp_path / "no-such-file") is None
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_unreadable_or_malformed_limits_are_ignored(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(
        tmp_path, "/a/b", {"/a/b": "garbage", "/a": "100000 0", "/": "200000 100000"}
    )
    assert cgroup_quota(root, proc) == 2.0


@pytest.mark.parametrize("line", ["0::", "0::relative/path", "garbage", "0::/ctr\x00"])
def test_a_malformed_proc_cgroup_is_no_limit(tmp_path: Path, line: str) -> None:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(line + "\n")
    assert cgroup_quota(tmp_path / "cgroup", proc) is None
    assert available_cpus(tmp_path / "cgroup", proc) == len(os.sched_getaffinity(0))


def test_without_sched_getaffinity_the_cpu_count_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cpus(tmp_path, tmp_path / "none") == 3.0


def _v1(folder: Path, quota: int, period: int = 100000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")


def test_a_v1_quota_down_the_tree_counts_as_on_a_host(tmp_path: Path) -> None:
    """A v1 host: systemd's CPUQuota= on the service's own slice."""
    root = tmp_path / "cgroup"
    _v1(root / "cpu,cpuacct", -1)
    _v1(root / "cpu,cpuacct" / "system.slice" / "hydrator.service", 50000)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:cpu,cpuacct:/system.slice/hydrator.service\n0::/\n")
    assert cgroup_quota(root, proc) == 0.5


def test_a_v1_quota_is_read_without_proc(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _v1(root / "cpu", 100000)
    assert cgroup_quota(root, tmp_path / "no-proc") == 1.0


def test_a_v1_quota_counts(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("2:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_quota(root, proc) == 1.0
    assert available_cpus(root, proc) == 1.0
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cgroup_quota(root, proc) is None


def test_the_quota_and_the_affinity_whichever_is_smaller(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, "/ctr", {"/ctr": "800000 100000"})
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0)), "8 CPUs' quota"


@pytest.mark.parametrize(
    ("mode", "cpus", "writer"),
    [
        ("auto", 2.0, ProcessWriter),
        ("auto", 16.0, ProcessWriter),
        ("auto", 1.5, ThreadWriter),
        ("auto", 1.0, ThreadWriter),
        ("process", 1.0, ProcessWriter),
        ("thread", 16.0, ThreadWriter),
    ],
)
def test_the_writer_for_the_cpus_there_are(mode: str, cpus: float, writer: type) -> None:
    assert choose_writer(mode, lambda: cpus) is writer  # type: ignore[arg-type]
