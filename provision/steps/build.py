"""Step: llama.cpp fork at a pinned commit.

Not implemented yet (issue #5): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "build"
TITLE = "llama.cpp fork at a pinned commit"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #5)", "skip it with --skip build")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #5)", "skip it with --skip build")
