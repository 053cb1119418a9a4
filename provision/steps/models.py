"""Step: GGUF model and MTP assistant head.

Not implemented yet (issue #6): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "models"
TITLE = "GGUF model and MTP assistant head"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #6)", "skip it with --skip models")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #6)", "skip it with --skip models")
