"""Kill `dmae pretrain` or `dmae certify` with SIGKILL at random moments, resume, compare.

The acceptance of issue #8 (reliability), on the real recipe rather than the tests' tiny one:

  pretrain  `dmae pretrain RECIPE` killed K times at random moments (a random epoch plus a
            random fraction of the next one) and resumed each time must never leave a
            checkpoint that does not load, and must end with a final epoch loss within 5% of
            an uninterrupted run's (same machine, same seed).
  certify   `dmae certify` killed K times and resumed must never leave a torn or rewritten row,
            and must end with the TSV of an uninterrupted run with the same seed, row for row
            (the `time` column, wall time, aside).

Each mode runs the uninterrupted reference into WORKDIR/straight and the killed one into
WORKDIR/killed (stderr of every run under WORKDIR/logs/), prints where each kill landed and
what it checked, then PASS or FAIL; the exit code is 0 on PASS, 1 on FAIL.

examples:
  python tools/kill_resume.py pretrain --kills 5
  python tools/kill_resume.py pretrain --kills 3 --set pretrain.epochs=20 --workdir /tmp/kr
  python tools/kill_resume.py certify --kills 5      # the latest sigma-0.5 model under ./runs
  python tools/kill_resume.py certify --checkpoint runs/digits-demo/finetune/sigma-0.5/best.pth
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUNG_S = 600  # a run that writes nothing for this long is hung, not slow


# -- running and killing --------------------------------------------------------------------
@dataclass
class Kill:
    """Where one SIGKILL landed."""

    landed: bool  # False: the run had ended (or failed) before the kill
    returncode: int
    seconds: float  # after the launch
    left_temporary: bool = False  # a .tmp file stayed behind: the kill cut an atomic write


def dmae(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmae_cli", *args]


def run_to_end(command: list[str], log: Path) -> None:
    """Run a command to completion; stop the tool if it fails."""
    with log.open("w") as err:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    if done.returncode != 0:
        sys.exit(f"FAIL: {' '.join(command)} exited {done.returncode}; see {log}")


def lines_written(path: Path) -> int:
    """Complete lines of a file another process is appending to (it may be mid-line)."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def kill_when(
    command: list[str], log: Path, reached: Callable[[], bool], delay: Callable[[], float]
) -> Kill:
    """Launch `command`, wait until `reached()`, sleep `delay()` seconds, SIGKILL it."""
    start = time.monotonic()
    with log.open("w") as err:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None and not reached():
            if time.monotonic() - start > HUNG_S:
                proc.kill()
                sys.exit(f"FAIL: no progress in {HUNG_S} s: {' '.join(command)}; see {log}")
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(delay())
        landed = proc.poll() is None
        if landed:
            proc.send_signal(signal.SIGKILL)
        returncode = proc.wait()
    if not landed and returncode != 0:
        sys.exit(f"FAIL: {' '.join(command)} exited {returncode} before the kill; see {log}")
    return Kill(landed, returncode, time.monotonic() - start)


def verdict(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return ok


# -- pretrain -------------------------------------------------------------------------------
def metrics(run: Path) -> list[dict]:
    """metrics.jsonl, one dict per line; every line must be whole JSON."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def pretrain_problems(run: Path) -> list[str]:
    """What is wrong with a pretraining directory after a kill (nothing, hopefully)."""
    from dmae_cli.runtime.checkpoint import load_checkpoint
    from dmae_cli.runtime.errors import UserError

    problems = []
    for path in sorted(run.glob("*.pth")):
        try:
            load_checkpoint(path)
        except UserError as exc:
            problems.append(f"corrupt checkpoint: {exc}")
    try:
        metrics(run)
    except json.JSONDecodeError as exc:
        problems.append(f"torn metrics.jsonl: {exc}")
    return problems


def last_epoch_seconds(run: Path) -> float:
    *whole, _partial = (run / "metrics.jsonl").read_text().split("\n")
    return float(json.loads(whole[-1])["epoch_time_s"])


def max_weight_difference(a: Path, b: Path) -> float:
    from dmae_cli.runtime.checkpoint import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def pretrain_acceptance(args: argparse.Namespace, work: Path) -> bool:
    from dmae_cli.config.recipe import load_recipe

    epochs = load_recipe(args.recipe, args.set).pretrain.epochs
    if args.kills > epochs - 2:
        sys.exit(f"--kills {args.kills}: at most {epochs - 2} for a {epochs}-epoch recipe")
    straight, killed, logs = work / "straight", work / "killed", work / "logs"
    sets = [x for item in args.set for x in ("--set", item)]

    def command(out: Path) -> list[str]:
        return dmae("pretrain", str(args.recipe), *sets, "--out", str(out))

    print(f"uninterrupted: {' '.join(command(straight))}")
    started = time.monotonic()
    run_to_end(command(straight), logs / "straight.txt")
    print(f"  {epochs} epochs in {time.monotonic() - started:.0f} s")

    rng = random.Random(args.seed)
    # Distinct epochs to kill in, spread over the run; each kill lands a random fraction of
    # an epoch (as long as the last one took) after that many epochs are done.
    targets = sorted(rng.sample(range(1, epochs - 1), args.kills))
    ok, landed = True, 0
    for number, target in enumerate(targets, start=1):
        metrics_file = killed / "metrics.jsonl"
        target = max(target, lines_written(metrics_file) + 1)
        fraction = rng.random()
        kill = kill_when(
            command(killed),
            logs / f"killed-{number}.txt",
            lambda: lines_written(metrics_file) >= target,  # noqa: B023
            lambda: fraction * last_epoch_seconds(killed),  # noqa: B023
        )
        kill.left_temporary = bool(list(killed.glob(".*.tmp")))
        landed += kill.landed
        problems = pretrain_problems(killed)
        where = f"epoch {target} + {fraction:.2f}" if kill.landed else "missed (run had ended)"
        cut = ", cut an atomic write" if kill.left_temporary else ""
        done = lines_written(metrics_file)
        print(
            f"kill {number}: {where}, {kill.seconds:.1f} s after launch{cut}; {done} metric "
            f"lines; {'; '.join(problems) or 'every checkpoint loads'}"
        )
        ok &= not problems
    print(f"resume to the end: {' '.join(command(killed))}")
    run_to_end(command(killed), logs / "resumed.txt")
    ok &= verdict(not pretrain_problems(killed), "no corrupt checkpoint after the last resume")

    a, b = metrics(straight)[-1], metrics(killed)[-1]
    ratio = b["loss"] / a["loss"]
    print(
        f"final loss (epoch {a['epoch']}): uninterrupted {a['loss']:.6f}, killed {landed} "
        f"times and resumed {b['loss']:.6f} (epoch {b['epoch']}); ratio {ratio:.6f}"
    )
    diff = max_weight_difference(straight / "last.pth", killed / "last.pth")
    print(f"largest weight difference between the two last.pth: {diff:.3g}")
    missing = sorted(
        {p.name for p in straight.glob("*.pth")} - {p.name for p in killed.glob("*.pth")}
    )
    ok &= verdict(landed == args.kills, f"{landed} of {args.kills} kills landed")
    ok &= verdict(a["epoch"] == b["epoch"] == epochs - 1, "both runs finished every epoch")
    ok &= verdict(not missing, f"checkpoints lost: {', '.join(missing) or 'none'}")
    epochs_logged = [r["epoch"] for r in metrics(killed)]
    ok &= verdict(epochs_logged == list(range(epochs)), "metrics.jsonl has one line per epoch")
    within = abs(ratio - 1) <= args.tolerance
    return verdict(within, f"final loss ratio {ratio:.4f} within {args.tolerance:.0%}") and ok


# -- certify --------------------------------------------------------------------------------
def find_model(args: argparse.Namespace, work: Path) -> Path:
    """--checkpoint, else the latest fine-tuned model for the sigma under --runs-dir (as
    `dmae certify` without a recipe finds it), else a short fine-tuning run made here."""
    from dmae_cli.config.recipe import sigma_name
    from dmae_cli.runtime.errors import UserError
    from dmae_cli.smoothing.found import latest_model

    if args.checkpoint is not None:
        return args.checkpoint
    try:
        return latest_model(args.runs_dir, args.sigma)
    except UserError:
        pass
    out = work / "finetune"
    print(f"no sigma-{args.sigma} model under {args.runs_dir}: fine-tuning a short one in {out}")
    command = dmae(
        "finetune", str(args.recipe), "--sigma", str(args.sigma), "--init", "none",
        "--set", "finetune.epochs=3", "--set", "finetune.eval_every=1", "--out", str(out),
    )  # fmt: skip
    run_to_end(command, work / "logs" / "finetune.txt")
    return out / sigma_name(args.sigma) / "best.pth"


def tsv_rows(path: Path) -> list[str]:
    """The rows of a TSV; raises ValueError unless every line is a whole, parsable row and
    no example appears twice."""
    from dmae_cli.smoothing.runfile import HEADER_LINE, Row

    text = path.read_text() if path.is_file() else ""
    if not text:
        return []
    if not text.endswith("\n"):
        raise ValueError(f"torn last line {text.splitlines()[-1]!r}")
    if not text.startswith(HEADER_LINE):
        raise ValueError("column header damaged")
    rows = text.splitlines()[1:]
    indices = [Row.parse(line).idx for line in rows]
    if indices != sorted(set(indices)):
        raise ValueError("an example certified twice")
    return rows


def without_time(rows: list[str]) -> list[list[str]]:
    from dmae_cli.smoothing.runfile import COLUMNS

    skip = COLUMNS.index("time")
    return [[c for i, c in enumerate(row.split("\t")) if i != skip] for row in rows]


def certify_problems(tsv: Path, before: list[str], reference: list[str]) -> list[str]:
    """What is wrong with a certification TSV after a kill, given the rows it had before."""
    from dmae_cli.smoothing.runfile import header_path

    try:
        json.loads(header_path(tsv).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"header unreadable: {exc}"]
    try:
        rows = tsv_rows(tsv)
    except ValueError as exc:
        return [f"{tsv.name}: {exc}"]
    problems = []
    if rows[: len(before)] != before:  # byte for byte, time included: not certified again
        problems.append("rows finished before this run were changed")
    if without_time(rows) != without_time(reference[: len(rows)]):
        problems.append("rows differ from the uninterrupted run")
    return problems


def certify_acceptance(args: argparse.Namespace, work: Path) -> bool:
    from dmae_cli.smoothing.runfile import Row, header_path, tsv_path

    model = find_model(args, work)
    straight, killed, logs = work / "straight", work / "killed", work / "logs"
    # Groups of --together examples are appended at once: small groups give the kills many
    # moments between appends, whatever the recipe packs for speed. A --set still wins.
    overrides = [f"certify.together={args.together}", *args.set]
    sets = [x for item in overrides for x in ("--set", item)]
    recipe = [str(args.recipe)] if args.recipe_given else []  # else the model's config.yaml

    def command(out: Path) -> list[str]:
        return dmae(
            "certify", *recipe, "--checkpoint", str(model), "--sigma", str(args.sigma),
            "-n", str(args.n), "--max-examples", str(args.max_examples), "--seed",
            str(args.certify_seed), *sets, "--out", str(out),
        )  # fmt: skip

    print(f"uninterrupted: {' '.join(command(straight))}")
    started = time.monotonic()
    run_to_end(command(straight), logs / "straight.txt")
    name = tsv_path(straight, args.sigma).name
    reference = tsv_rows(straight / name)
    count = len(reference)
    # Examples are certified in groups of `together` whose rows are appended at once (1 in
    # older files), and each row's `time` spans its group's certification: one step.
    group = json.loads(header_path(straight / name).read_text()).get("together", 1)
    step_s = sum(Row.parse(r).time for r in reference) / count
    steps = -(-count // group)
    print(f"  {count} examples in {time.monotonic() - started:.0f} s: {steps} groups of {group}, "
          f"{step_s:.3f} s each")  # fmt: skip
    if args.kills > steps - 1:
        sys.exit(f"--kills {args.kills}: at most {steps - 1} for {steps} groups; more examples")

    rng = random.Random(args.seed)
    # Distinct numbers of groups to kill after (0: as soon as the TSV exists), then a random
    # fraction of a group's time on top, so that most kills land inside a group.
    planned = sorted(rng.sample(range(steps - 1), args.kills))
    tsv, rows, ok, landed = killed / name, [], True, 0
    for number, after in enumerate(planned, start=1):
        if number > 1:  # wait for a new group, so the kill lands inside one, not at startup
            after = max(after, -(-len(rows) // group) + 1)
        target = min(after * group, count)
        fraction = rng.random()
        kill = kill_when(
            command(killed),
            logs / f"killed-{number}.txt",
            lambda: tsv.is_file() and lines_written(tsv) - 1 >= target,  # noqa: B023
            lambda: fraction * step_s,  # noqa: B023
        )
        landed += kill.landed
        problems = certify_problems(tsv, rows, reference)
        new_rows = tsv_rows(tsv) if not problems else rows
        where = f"group {after} + {fraction:.2f}" if kill.landed else "missed (run had ended)"
        print(
            f"kill {number}: {where}, {kill.seconds:.1f} s after launch; {len(new_rows)} "
            f"rows kept ({len(new_rows) - len(rows)} new); "
            f"{'; '.join(problems) or 'whole rows, header intact'}"
        )
        ok &= not problems
        rows = new_rows
    print(f"resume to the end: {' '.join(command(killed))}")
    run_to_end(command(killed), logs / "resumed.txt")
    problems = certify_problems(tsv, rows, reference)
    ok &= verdict(not problems, "; ".join(problems) or "finished rows kept as they were")
    ok &= verdict(landed == args.kills, f"{landed} of {args.kills} kills landed")
    same = without_time(tsv_rows(tsv)) == without_time(reference)
    return verdict(same, f"the {count} rows equal the uninterrupted run's, time aside") and ok


# -- command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kills", type=int, default=5, help="SIGKILLs (default 5)")
    common.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    common.add_argument(
        "--workdir", type=Path, help="where both runs go (default: a new temporary directory)"
    )
    common.add_argument(
        "--recipe",
        type=Path,
        help="recipe YAML (default: recipes/digits.yaml for pretrain, the config.yaml saved next "
        "to the model for certify)",
    )
    common.add_argument("--set", action="append", default=[], help="recipe override, repeatable")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    pretrain = modes.add_parser("pretrain", parents=[common], help="kill and resume pretrain")
    pretrain.add_argument(
        "--tolerance", type=float, default=0.05, help="allowed relative final-loss gap (0.05)"
    )
    certify = modes.add_parser("certify", parents=[common], help="kill and resume certify")
    certify.add_argument("--checkpoint", type=Path, help="fine-tuned classifier to certify")
    certify.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where to look for one (runs)"
    )
    certify.add_argument("--sigma", type=float, default=0.5)
    certify.add_argument("--n", type=int, default=1000, help="estimation samples per example")
    certify.add_argument("--max-examples", type=int, default=120, help="(120: 15 groups of 8)")
    certify.add_argument(
        "--together", type=int, default=8, help="examples certified side by side (8)"
    )
    certify.add_argument("--certify-seed", type=int, default=0, help="seed of the noise")
    args = parser.parse_args(argv)
    # The runs go from the repository root: make every path the user gave absolute first.
    args.recipe_given = args.recipe is not None
    args.recipe = (args.recipe or REPO / "recipes" / "digits.yaml").resolve()
    for name in ("workdir", "checkpoint", "runs_dir"):
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))  # run from a checkout without installing it
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"kill-resume-{args.mode}-"))
    if (work / "killed").exists():
        sys.exit(f"{work / 'killed'} exists: give an empty --workdir (or delete it)")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; kill seed {args.seed}; {os.cpu_count()} CPUs")
    accept = pretrain_acceptance if args.mode == "pretrain" else certify_acceptance
    ok = accept(args, work)
    print(f"{'PASS' if ok else 'FAIL'}: dmae {args.mode} killed {args.kills} times and resumed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
