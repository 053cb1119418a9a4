"""llama-fit-params: memory estimates without allocating anything (`-fitp on`, under a second a call).

With `-fitp on` the tool prints, on stdout, one line per device and one for the host (common/fit.cpp
`common_fit_print`):

    CUDA0 7012 54 240          <device> <model MiB> <context MiB> <compute MiB>
    Host 9680 0 12

Log lines go to stderr (and, on the fork's newest build, may carry a time/level prefix); only lines of
exactly that shape are read. A CPU-only build prints just the Host line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

LINE = re.compile(r"^\s*([A-Za-z][\w.:-]*)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


@dataclass(frozen=True)
class Estimate:
    device: str
    model: int
    context: int
    compute: int

    @property
    def total(self) -> int:
        return self.model + self.context + self.compute


class FitParamsError(Exception):
    pass


def parse(stdout: str) -> dict[str, Estimate]:
    """{device name: Estimate}, in the order printed (the host as 'Host')."""
    out: dict[str, Estimate] = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(1)] = Estimate(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
    return out


def device_total(est: dict[str, Estimate], device: Optional[str] = None) -> int:
    """The first GPU device's total (model + context + compute), or the named device's."""
    if device:
        if device not in est:
            raise FitParamsError(f"llama-fit-params printed no estimate for {device} (devices: {', '.join(est) or 'none'})")
        return est[device].total
    gpus = [e for name, e in est.items() if name != "Host"]
    if not gpus:
        raise FitParamsError("llama-fit-params printed no GPU device line (a CPU-only build, or no GPU visible): "
                             + (", ".join(f"{e.device} {e.model}/{e.context}/{e.compute}" for e in est.values()) or "no output"))
    return gpus[0].total


def argv(binary: str, *, model: str, n_cpu_moe: int, ctx: int, serve: dict, accepted=None) -> list[str]:
    """The fit-params command for one value at the user's settings. `accepted(flag) -> bool` comes from the
    binary's parsed --help (None: not known)."""
    args = [binary, "-m", model, "-fitp", "on", "-ngl", str(serve.get("n_gpu_layers", 999)),
            "-c", str(ctx), "-fa", str(serve.get("flash_attn", "on")),
            "-ctk", str(serve.get("cache_type_k", "f16")), "-ctv", str(serve.get("cache_type_v", "f16"))]
    if n_cpu_moe:
        args += ["-ncmoe", str(n_cpu_moe)]
    # -np is a server option upstream (fit-params then assumes one sequence, like serve.parallel 1): pass it
    # only where this build's --help lists it.
    if accepted is not None and accepted("-np"):
        args += ["-np", str(serve.get("parallel", 1))]
    if serve.get("override_tensor"):
        args += ["-ot", ",".join(serve["override_tensor"])]
    return args
