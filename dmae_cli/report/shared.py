"""Runs compared at one sigma are compared on the same examples.

The certified accuracies of two runs at one sigma compare their classifiers only when both
certified the same test examples: a run certified on the first 500 images and another on the
first 1,000 (or on a shard) differ by their samples too. So when the runs of a report certified
different example indices at one sigma, each of their files at that sigma is cut down to the
indices they all share, and one warning line says how many examples each had and how many they
share. A file sharing no example with the others is reported as it is, with a warning. The
files of one run are not cut against each other: a single run's tables stay as they were (the
report warns when its files differ in size).
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from dmae_cli.report.inputs import CertResults
from dmae_cli.report.rows import warn


def on_shared_examples(by_run: dict[str, list[CertResults]]) -> dict[str, list[CertResults]]:
    """Every run's files, those at a sigma that several runs certified cut to the examples
    they share; with fewer than two runs, the files as they are."""
    if len(by_run) < 2:
        return by_run
    at_sigma: dict[float, list[tuple[str, int]]] = {}
    for run, files in by_run.items():
        for i, results in enumerate(files):
            at_sigma.setdefault(results.sigma, []).append((run, i))
    cut = {run: list(files) for run, files in by_run.items()}
    for sigma, members in at_sigma.items():
        if len({run for run, _ in members}) > 1:
            shared = _on_shared(sigma, [cut[run][i] for run, i in members])
            for (run, i), results in zip(members, shared, strict=True):
                cut[run][i] = results
    return cut


def _on_shared(sigma: float, files: list[CertResults]) -> list[CertResults]:
    """`files` (of several runs, at one sigma) cut to the examples they share."""
    where = f"sigma {sigma:g}"
    ids = [f.indices() for f in files]
    unnamed = next((f for f, i in zip(files, ids, strict=True) if i is None), None)
    if unnamed is not None:
        warn(
            f"{where}: cannot check that the runs certified the same examples: {unnamed.path} "
            f"does not name its examples by integer idx; each is reported on its own examples"
        )
        return files
    named = [i for i in ids if i is not None]  # all of them
    if all(np.array_equal(np.sort(named[0]), np.sort(i)) for i in named[1:]):
        return files
    names = _names(files)
    alone = [j for j in range(len(files)) if not _meets_others(named, j)]
    for j in alone:
        warn(
            f"{where}: {names[j]} certified none of the other runs' examples; reported on its "
            f"own {len(files[j])}"
        )
    rest = [j for j in range(len(files)) if j not in alone]
    if len(rest) < 2:
        return files
    shared = reduce(np.intersect1d, [named[j] for j in rest])
    if not shared.size:
        warn(f"{where}: no example was certified by all the runs; each is reported on its own")
        return files
    if all(len(named[j]) == shared.size for j in rest):
        return files  # the same examples, but for a run that shares none
    counts = ", ".join(f"{names[j]} {len(files[j])}" for j in rest)
    warn(
        f"{where}: the runs certified different examples ({counts}); compared on the "
        f"{shared.size} they share"
    )
    out = list(files)
    for j in rest:
        out[j] = files[j].only(np.isin(named[j], shared))
    return out


def _meets_others(ids: list[np.ndarray], j: int) -> bool:
    """Whether file j shares an example with any other file."""
    others = np.concatenate([ids[k] for k in range(len(ids)) if k != j])
    return bool(np.isin(ids[j], others).any())


def _names(files: list[CertResults]) -> list[str]:
    """Each file's run, and the file's name where one run has two files at this sigma."""
    runs = [f.run for f in files]
    return [f.run if runs.count(f.run) == 1 else f"{f.run} ({f.path.name})" for f in files]
