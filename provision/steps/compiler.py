"""Step: gcc-14 host compiler shims.

Not implemented yet (issue #4): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "compiler"
TITLE = "gcc-14 host compiler shims"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip compiler")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip compiler")
