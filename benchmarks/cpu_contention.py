"""CPU time of digits pre-training alone and beside busy processes, torch's thread defaults
against dmae's.

On a machine whose cores are all busy, torch's OpenMP threads spin while they wait for each
other, so a run beside another CPU-bound process burns far more CPU time than alone, with no
more work done. The `dmae` entry point sets `OMP_WAIT_POLICY=PASSIVE` and a thread count from
the cores the process may use (`dmae_cli/runtime/cpus.py`) before torch loads. This script
runs the same pre-training (digits recipe, `--epochs` epochs, no reconstructions) as a child
process in four ways, repeated and alternated so that a noisy neighbour hits every way alike:

- torch default: the command line started without the entry point's settings;
- dmae default: `python -m dmae_cli`, as the `dmae` command starts;
each alone and beside `--busy` processes that spin (`while True: pass`). It reports each
child's CPU seconds (user + system, from the kernel's rusage: the cost to everyone else on the
machine) and wall seconds, their medians and the ratio beside/alone, as a markdown table.
The target: CPU time beside a busy process at most 1.5x the CPU time alone. The machine's
load average is printed before and after: other work on the machine makes "alone" less alone.

    python benchmarks/cpu_contention.py                  # 3 repeats, 2 epochs, 1 busy process
    python benchmarks/cpu_contention.py --repeats 1 --epochs 1 --busy 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import command_line, cpu_name, markdown_table  # noqa: E402

# Variables that decide OpenMP's threads: removed from the children's environment so that each
# way runs with its own defaults, whatever the calling shell exported.
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
WAYS = {
    "torch default": [sys.executable, "-c", "from dmae_cli.cli.app import main; main()"],
    "dmae default": [sys.executable, "-m", "dmae_cli"],
}
TARGET = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="pre-training epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way and case")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes beside")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "digits.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    return parser.parse_args(argv)


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes that keep one core each busy, ended (by their handles) on exit."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0.0)  # running before the measured child starts
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
        for spinner in spinners:
            spinner.wait()


def run_once(way: str, busy: int, args: argparse.Namespace, runs_dir: Path, tag: str) -> tuple:
    """One pre-training child: (CPU seconds, wall seconds) measured by the kernel."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    sets = [
        f"runs_dir={runs_dir}",
        f"name=run-{tag}",
        f"pretrain.epochs={args.epochs}",
        "pretrain.reconstructions=0",
        "device=cpu",
        *args.overrides,
    ]
    command = [*WAYS[way], "pretrain", args.recipe] + [x for s in sets for x in ("--set", s)]
    log = runs_dir / f"run-{tag}.log"
    with busy_processes(busy), open(log, "wb") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"{way} failed ({child.returncode}); the end of its log:\n{tail}")
    return usage.ru_utime + usage.ru_stime, wall


def measure(args: argparse.Namespace, runs_dir: Path) -> dict[tuple[str, int], list[tuple]]:
    """Every way alone and beside `--busy` processes, `--repeats` times, order alternated."""
    results: dict[tuple[str, int], list[tuple]] = {}
    ways = list(WAYS)
    for repeat in range(args.repeats):
        order = ways if repeat % 2 == 0 else ways[::-1]
        cases = [0, args.busy] if repeat % 2 == 0 else [args.busy, 0]
        for way in order:
            for busy in cases:
                cpu, wall = run_once(way, busy, args, runs_dir, f"{repeat}-{way[:5]}-{busy}")
                results.setdefault((way, busy), []).append((cpu, wall))
                print(f"  {way}, {busy} busy: {cpu:.1f} CPU s, {wall:.1f} s wall", flush=True)
    return results


def spread(values: list[float]) -> str:
    text = f"{statistics.median(values):.1f}"
    return text if len(values) == 1 else f"{text} ({min(values):.1f}-{max(values):.1f})"


def table(results: dict[tuple[str, int], list[tuple]], busy: int) -> str:
    rows = []
    for way in WAYS:
        alone, beside = results[(way, 0)], results[(way, busy)]
        ratio = statistics.median([b[0] for b in beside]) / statistics.median([a[0] for a in alone])
        rows.append(
            [
                way,
                spread([a[0] for a in alone]),
                spread([a[1] for a in alone]),
                spread([b[0] for b in beside]),
                spread([b[1] for b in beside]),
                f"**{ratio:.2f}x**",
            ]
        )
    header = ["threads", "alone: CPU s", "alone: wall s", f"beside {busy} busy: CPU s"]
    return markdown_table([*header, "beside: wall s", "CPU beside / alone"], rows)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu_name()}, {cores} usable of {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"load average before (1, 5, 15 min): {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dmae-contention-") as tmp:
        results = measure(args, Path(tmp))
    print(f"load average after (1, 5, 15 min): {load()}\n")
    print(f"`{command_line()}`: {args.epochs} epoch(s) of digits pre-training per run, median")
    print(f"of {args.repeats} run(s) (min-max); CPU = user + system seconds of the run's process\n")
    print(table(results, args.busy))
    alone = statistics.median(r[0] for r in results[("dmae default", 0)])
    beside = statistics.median(r[0] for r in results[("dmae default", args.busy)])
    verdict = "met" if beside <= TARGET * alone else "NOT met"
    print(f"\ntarget: dmae default CPU beside <= {TARGET}x alone: {beside / alone:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
