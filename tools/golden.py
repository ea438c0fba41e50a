"""Record the pipeline's outputs once, then check that a refactor reproduces them exactly.

What is compared (every file a run writes that does not hold wall time or paths):
  - the certify TSVs, row for row, the `time` column aside;
  - the pretrain and finetune `metrics.jsonl` losses and accuracies (to 1e-6 relative);
  - the report CSV.

Profiles:
  full  `dmae demo` (cohen, both sigmas) and `dmae certify recipes/digits.yaml --certifier
        sequential --n 10000 --max-examples 60` on the demo's sigma-0.5 model: about ten
        minutes on two CPU cores.
  tiny  the same commands with the test suite's width-32 model and short budgets: seconds;
        tests/test_golden.py checks it on every CI run.

The reference lives in tests/golden/<profile>/. Results depend on the machine's float
arithmetic (CPU kind, thread count): record and check on the same machine.

examples:
  python tools/golden.py record --profile full      # on main, before moving code
  python tools/golden.py check --profile full       # after: prints PASS or each difference
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.options={embed_dim: 32, depth: 2, num_heads: 2}",
    "pretrain.decoder_embed_dim=32",
    "pretrain.decoder_depth=1",
    "pretrain.decoder_num_heads=2",
    "pretrain.epochs=2",
    "pretrain.reconstructions=0",
    "finetune.epochs=2",
    "finetune.eval_every=1",
    "certify.n0=16",
    "certify.n=64",
    "certify.max_examples=12",
]
PROFILES: dict[str, dict[str, list[str]]] = {
    "full": {"set": [], "sequential": ["--n", "10000", "--max-examples", "60"]},
    "tiny": {"set": TINY, "sequential": ["--n", "400", "--max-examples", "12"]},
}
METRICS = ("loss", "acc_clean", "acc_noisy", "lr")
MACHINE = "_machine"  # the reference's entry naming the machine it was recorded on


def dmae(*args: str, env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "dmae_cli", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr}")


def sets(items: list[str]) -> list[str]:
    return [word for item in items for word in ("--set", item)]


def run_pipeline(profile: str, work: Path) -> dict[str, object]:
    """Run the profile's commands under `work`; return what they wrote, made comparable."""
    env = {**os.environ, "DMAE_PLUGINS": "builtin", "OMP_NUM_THREADS": "2", "COLUMNS": "100"}
    overrides = [*PROFILES[profile]["set"], f"runs_dir={work}"]
    dmae("demo", *sets(overrides), env=env)
    run = work / "digits-demo"
    model = run / "finetune" / "sigma-0.5" / "best.pth"
    sequential = PROFILES[profile]["sequential"]
    seq_out = work / "sequential"
    dmae(
        "certify", "recipes/digits.yaml", "--certifier", "sequential", "--sigma", "0.5",
        "--checkpoint", str(model), "--out", str(seq_out), *sequential,
        *sets(overrides), env=env,
    )  # fmt: skip
    outputs: dict[str, object] = {}
    for tsv in sorted([*(run / "certify").glob("*.tsv"), *seq_out.glob("*.tsv")]):
        outputs[f"{tsv.parent.name}/{tsv.name}"] = tsv_rows(tsv)
    for metrics in sorted(run.glob("**/metrics.jsonl")):
        outputs[str(metrics.relative_to(run))] = metric_rows(metrics)
    for csv in sorted((run / "report").glob("*.csv")):
        outputs[f"report/{csv.name}"] = csv.read_text().replace(str(work), "<work>").splitlines()
    return outputs


def tsv_rows(path: Path) -> list[list[str]]:
    """Data rows without the `time` column (wall time differs from run to run)."""
    lines = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    header = next(row for row in lines if row[0] == "idx")
    keep = [i for i, name in enumerate(header) if name != "time"]
    return [[row[i] for i in keep if i < len(row)] for row in lines if not row[0].startswith("#")]


def metric_rows(path: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: row[k] for k in METRICS if k in row} for row in rows]


def machine() -> list[str]:
    """What the float results depend on: torch's version and the CPU's vector unit."""
    import platform

    import torch

    return [torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability()]


def differences(expected: dict, actual: dict, rtol: float = 1e-6) -> list[str]:
    """Every way `actual` departs from `expected`; empty when they agree."""
    expected, actual = without_machine(expected), without_machine(actual)
    found = [f"{key}: missing" for key in expected if key not in actual]
    found += [f"{key}: not in the reference" for key in actual if key not in expected]
    for key in sorted(set(expected) & set(actual)):
        if key.endswith("metrics.jsonl"):
            found += metric_differences(key, expected[key], actual[key], rtol)
        elif expected[key] != actual[key]:
            pairs = zip(expected[key], actual[key], strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            found.append(f"{key}: differs (first at row {first}; {len(expected[key])} rows)")
    return found


def without_machine(outputs: dict) -> dict:
    return {key: value for key, value in outputs.items() if key != MACHINE}


def metric_differences(key: str, expected: list, actual: list, rtol: float) -> list[str]:
    if len(expected) != len(actual):
        return [f"{key}: {len(actual)} lines, the reference has {len(expected)}"]
    found = []
    for line, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for name, value in want.items():
            other = got.get(name)
            if other is None or abs(other - value) > rtol * max(abs(value), 1e-12):
                found.append(f"{key} line {line} {name}: {other} != {value}")
    return found


def dump(outputs: dict[str, list]) -> str:
    """JSON with one row per line, so that a diff of the reference reads like a diff of files."""
    blocks = [
        f"{json.dumps(key)}: [\n" + ",\n".join(f"  {json.dumps(row)}" for row in rows) + "\n ]"
        for key, rows in sorted(outputs.items())
    ]
    return "{\n " + ",\n ".join(blocks) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    reference = REPO / "tests" / "golden" / f"{args.profile}.json"
    with tempfile.TemporaryDirectory() as temp:
        outputs = run_pipeline(args.profile, args.workdir or Path(temp))
    if args.mode == "record":
        reference.parent.mkdir(parents=True, exist_ok=True)
        reference.write_text(dump({**outputs, MACHINE: machine()}))
        print(f"recorded {len(outputs)} outputs in {reference}")
        return 0
    recorded = json.loads(reference.read_text())
    if recorded.get(MACHINE) != machine():
        print(f"note: recorded on {recorded.get(MACHINE)}, checking on {machine()}")
    found = differences(recorded, outputs)
    for line in found:
        print(line)
    print("FAIL" if found else f"PASS: {len(outputs)} outputs equal {reference}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
