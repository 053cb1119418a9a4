"""Step: CUDA 12.9 toolkit without NVIDIA's driver.

Not implemented yet (issue #4): check() reports that as a failure, never as success."""

from __future__ import annotations

from ..engine import Check, StepError

NAME = "cuda"
TITLE = "CUDA 12.9 toolkit without NVIDIA's driver"
FACTS: list = []


def check(facts: dict, cfg: dict) -> Check:
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip cuda")


def apply(host, facts: dict, cfg: dict, check: Check):
    raise StepError(f"{NAME}: not implemented yet (issue #4)", "skip it with --skip cuda")
