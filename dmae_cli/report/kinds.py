"""How a run file's classifier was made: the ways of getting a certified classifier.

`dmae certify` records in each run file's JSON header (`dmae_cli.smoothing.runfile`) the
noise the classifier was fine-tuned at, `classifier_sigma` (0 for a clean classifier trained
without noise), and, when it certified f(D(x + noise)) through a DMAE denoiser, `denoiser`
(its checkpoint) and `denoiser_tuned_for` (the classifier it was tuned for, null when untuned).
From them each file has a `Kind`:

  clean classifier alone (not a smoothing model)       classifier_sigma 0, no denoiser
  clean classifier + DMAE denoiser                     classifier_sigma 0, an untuned denoiser
  clean classifier + tuned DMAE denoiser               classifier_sigma 0, a denoiser tuned for it
  ... + DMAE denoiser tuned for another classifier     denoiser_tuned_for != checkpoint_sha256
  classifier (sigma s) + DMAE denoiser                 classifier_sigma s > 0, a denoiser
  classifier fine-tuned with noise (the paper's way)   classifier_sigma > 0, no denoiser

A header that says neither (files from before these keys, other tools' files) gives no kind,
and the report reads as it did. A run is of its files' kind (`run_kind`), or of mixed kinds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dmae_cli.report.rows import warn
from dmae_cli.runtime.errors import UserError

CLEAN, NOISY, UNKNOWN = "clean", "noise-trained", ""  # what the header says of the classifier
DENOISER, TUNED = "DMAE denoiser", "tuned DMAE denoiser"
TUNED_ELSEWHERE = "DMAE denoiser tuned for another classifier"
CLEAN_ALONE = "clean classifier alone (not a smoothing model)"
PAPERS_WAY = "classifier fine-tuned with noise (the paper's way)"
NOT_RECORDED = "kind not recorded"


@dataclass(frozen=True)
class Kind:
    """How the certified classifier was made, as the report names it."""

    classifier: str  # CLEAN, NOISY or UNKNOWN (a denoised file that does not say)
    denoiser: str = ""  # "", DENOISER, TUNED or TUNED_ELSEWHERE
    sigma: float | None = None  # a noise-trained classifier's sigma, named beside a denoiser
    mixed: tuple[str, ...] = ()  # a run of files of different kinds: their labels

    @property
    def label(self) -> str:
        """The name shown beside a run or file in the tables."""
        if self.mixed:
            return "mixed: " + "; ".join(self.mixed)
        if not self.denoiser:
            return CLEAN_ALONE if self.classifier == CLEAN else PAPERS_WAY
        front = self._front("clean classifier", "classifier", "noise-trained classifier")
        return f"{front} + {self.denoiser}"

    @property
    def short(self) -> str:
        """A shorter name, for a legend or a row of the comparison with the paper."""
        if self.mixed:
            return "mixed kinds"
        if not self.denoiser:
            return (
                "clean alone, not a smoothing model" if self.classifier == CLEAN else "paper's way"
            )
        tuned = {TUNED: "tuned denoiser", TUNED_ELSEWHERE: "denoiser tuned for another"}.get(
            self.denoiser, "denoiser"
        )
        return f"{self._front('clean', 'classifier', 'noise-trained')} + {tuned}"

    @property
    def papers_way(self) -> bool:
        """The classifier fine-tuned with noise and nothing in front: what dmae always did."""
        return self.classifier == NOISY and not self.denoiser and not self.mixed

    def _front(self, clean: str, unknown: str, noisy: str) -> str:
        if self.classifier == CLEAN:
            return clean
        if self.classifier == UNKNOWN:
            return unknown
        return noisy if self.sigma is None else f"classifier (sigma {self.sigma:g})"


def file_kind(header: dict[str, Any], where: Path) -> Kind | None:
    """The kind its JSON header (at `where`) gives a run file; None when it says nothing."""
    sigma = _classifier_sigma(header.get("classifier_sigma"), where)
    classifier = UNKNOWN if sigma is None else CLEAN if sigma == 0 else NOISY
    if not header.get("denoiser"):
        return None if sigma is None else Kind(classifier)
    tuned_for = header.get("denoiser_tuned_for")
    denoiser = DENOISER if not tuned_for else TUNED_ELSEWHERE
    if tuned_for and tuned_for == header.get("checkpoint_sha256"):
        denoiser = TUNED  # tuned for this very classifier file
    return Kind(classifier, denoiser, sigma if classifier == NOISY else None)


def _classifier_sigma(value: Any, where: Path) -> float | None:
    if value is None:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise UserError(
            f"{where}: classifier_sigma {value!r} is not a finite number >= 0 (0 for a clean "
            f"classifier, null when not known)"
        )
    return float(value)


def run_kind(run: str, kinds: Sequence[Kind | None]) -> Kind | None:
    """The kind of a run whose files have `kinds`: theirs when they agree (a noise-trained
    classifier's sigma aside: one run fine-tunes one per sigma), else mixed, with a warning."""
    distinct = list(dict.fromkeys(kinds))
    if distinct == [None]:
        return None
    if None not in distinct and len({replace(k, sigma=None) for k in distinct}) == 1:
        first = distinct[0]
        return first if len(distinct) == 1 else replace(first, sigma=None)
    labels = tuple(NOT_RECORDED if k is None else k.label for k in distinct)
    warn(f"run {run}: its files are of different kinds ({'; '.join(labels)})")
    return Kind(UNKNOWN, mixed=labels)
