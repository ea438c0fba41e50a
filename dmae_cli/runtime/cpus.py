"""The CPU threads a `dmae` command uses: as many as the cores it may really run on, asleep
when they wait.

Set by the entry point before torch loads, because OpenMP reads its settings once, when it
starts. Two defaults of torch's go wrong on shared machines:

- OpenMP threads that finish their share of an operation spin, waiting for the others. With
  every core busy (another job beside ours) the thread being waited for is off its core while
  the waiting one burns it: on a 2-core machine beside one busy process `dmae demo` took three
  times the CPU time it needs alone. `OMP_WAIT_POLICY=PASSIVE` makes a waiting thread sleep.
- torch starts one thread per core of the machine, not of the process: a container limited to
  2 CPUs (cgroup `cpu.max`) on a 64-core host ran 64 threads, throttled most of the time.
  `OMP_NUM_THREADS` becomes the physical cores of the CPU affinity, capped by the cgroup quota.

A value the user set in the environment is never changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
SYSFS_CPU = Path("/sys/devices/system/cpu")


def thread_settings(
    environ: MutableMapping[str, str] | None = None,
    cgroup: Path = CGROUP,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    sysfs_cpu: Path = SYSFS_CPU,
) -> dict[str, str]:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS in `environ` (os.environ) where unset.

    Returns the variables set, for a note under DMAE_DEBUG."""
    env = os.environ if environ is None else environ
    wanted = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": str(usable_cores(cgroup, proc_cgroup, sysfs_cpu)),
    }
    applied = {key: value for key, value in wanted.items() if key not in env}
    env.update(applied)
    return applied


def usable_cores(
    cgroup: Path = CGROUP,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    sysfs_cpu: Path = SYSFS_CPU,
) -> int:
    """Physical cores among the CPUs this process may run on, at most its cgroup quota (>= 1).

    The quota is rounded down: 2.5 CPUs of quota run 2 threads, which a 3rd would get throttled.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = physical_cores(cpus, sysfs_cpu) if cpus else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def physical_cores(cpus: list[int], sysfs_cpu: Path = SYSFS_CPU) -> int:
    """Distinct (package, core) pairs among `cpus`: two hyperthreads of one core count once,
    as torch itself counts them; every CPU counts when the topology cannot be read."""
    seen: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sysfs_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        seen.add((package, core))
    return len(seen)


def cgroup_cpu_quota(
    cgroup: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs of quota of this process's cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None when
    unlimited or unreadable. Read from the process's own cgroup, else the mount's root (inside a
    container the cgroup namespace makes its own cgroup the root)."""
    for own in _cgroup_paths(proc_cgroup):
        own = own.lstrip("/")
        for base in (cgroup / own, cgroup / "cpu" / own, cgroup, cgroup / "cpu"):
            quota = _read_quota(base)
            if quota is not None:
                return quota if quota > 0 else None
    return None


def _cgroup_paths(proc_cgroup: Path) -> list[str]:
    """This process's cgroup paths: the v2 one ('0::/x') and the v1 cpu controller's."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return ["/"]
    paths = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" or "cpu" in controllers.split(","):
            paths.append(path or "/")
    return paths or ["/"]


def _read_quota(base: Path) -> float | None:
    """The quota in `base` in CPUs; 0.0 for unlimited; None when `base` holds none."""
    try:
        quota, _, period = (base / "cpu.max").read_text().strip().partition(" ")
        return 0.0 if quota == "max" else int(quota) / int(period or 100_000)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((base / "cpu.cfs_quota_us").read_text())
        period_us = int((base / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return 0.0 if quota_us <= 0 else quota_us / period_us
