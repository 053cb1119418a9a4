"""Step: NVIDIA 580xx driver branch.

Not implemented yet (issue #4): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "driver"
TITLE = "NVIDIA 580xx driver branch"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip driver")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip driver")
