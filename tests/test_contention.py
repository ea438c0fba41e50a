"""CPU threads that do not collapse on a shared machine (dmae_cli/runtime/cpus.py).

Beside other CPU-bound processes torch's OpenMP threads spun while waiting for each other
(`dmae demo` used 24.9 CPU-minutes against 7.7 alone); in a container limited by a cgroup quota
torch started a thread per core of the host. The `dmae` entry point sets OMP_WAIT_POLICY=PASSIVE
and OMP_NUM_THREADS from the usable cores before torch loads, never over a user's setting.
benchmarks/cpu_contention.py measures the effect (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmae_cli.runtime import cpus

ROOT = Path(__file__).resolve().parents[1]


def sysfs(tmp_path: Path, cores: list[tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu with (package, core) for cpu0, cpu1, ..."""
    root = tmp_path / "cpu"
    for cpu, (package, core) in enumerate(cores):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthreads_of_one_core_count_once(tmp_path: Path) -> None:
    root = sysfs(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0)])
    assert cpus.physical_cores([0, 1, 2, 3, 4], root) == 3
    assert cpus.physical_cores([0, 2], root) == 1
    assert cpus.physical_cores([0, 7], root) == 2  # no topology for cpu7: every CPU counts


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "250000 100000\n"}, 2.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v2_and_v1(tmp_path: Path, files: dict[str, str], expected: object) -> None:
    cgroup = tmp_path / "cgroup"
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/job\n1:cpu,cpuacct:/\n0::/\n")
    assert cpus.cgroup_cpu_quota(cgroup, proc) == expected


def test_own_cgroup_before_the_root(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    (cgroup / "slurm" / "job7").mkdir(parents=True)
    (cgroup / "slurm" / "job7" / "cpu.max").write_text("200000 100000\n")
    (cgroup / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/slurm/job7\n")
    assert cpus.cgroup_cpu_quota(cgroup, proc) == 2.0


def test_threads_are_the_usable_cores_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    root = sysfs(tmp_path, [(0, 0), (0, 1), (0, 2), (0, 3)])
    cgroup, proc = tmp_path / "cgroup", tmp_path / "proc-cgroup"
    cgroup.mkdir()
    proc.write_text("0::/\n")
    assert cpus.usable_cores(cgroup, proc, root) == 4
    (cgroup / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: a 3rd thread gets throttled
    assert cpus.usable_cores(cgroup, proc, root) == 2
    (cgroup / "cpu.max").write_text("50000 100000\n")
    assert cpus.usable_cores(cgroup, proc, root) == 1
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice stays
    assert cpus.thread_settings(env, cgroup, proc, root) == {"OMP_NUM_THREADS": "1"}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}


# Records the environment at the moment torch is first imported, then runs the entry point.
SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append((os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS")))
sys.meta_path.insert(0, Spy())
sys.argv = ["dmae", "plugins"]
from dmae_cli.__main__ import main
try:
    main()
except SystemExit:
    pass
import torch
print(seen[0], torch.get_num_threads())
"""


@pytest.mark.parametrize(
    ("given", "policy"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")]
)
def test_entry_point_sets_threads_before_torch_loads(given: dict, policy: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")} | given
    out = subprocess.run(
        [sys.executable, "-c", SPY], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    threads = cpus.usable_cores()
    assert out.splitlines()[-1] == f"('{policy}', '{threads}') {threads}"


def test_the_console_script_is_the_entry_point() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("[")[0]
    assert scripts.strip() == 'dmae = "dmae_cli.__main__:main"'  # not cli.app: torch loads there
