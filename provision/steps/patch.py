"""Step: CUDA math_functions.h patch for glibc >= 2.41.

Not implemented yet (issue #4): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "patch"
TITLE = "CUDA math_functions.h patch for glibc >= 2.41"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip patch")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip patch")
