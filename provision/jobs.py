"""How many parallel compile jobs a build may run: bounded by cores AND by memory.

Each heavy CUDA translation unit (the flash-attention template instances) takes about 3-5 GB of RAM
in nvcc/cicc; an unbounded `make -j`/`ninja` with one job per core on a box with little memory ends
in OOM kills (`cicc terminated (signal: 11)`). So the job count is

    jobs = min(cores, MemAvailable / mem_per_job_gb), at least 1,

unless the configuration names a number (build.jobs > 0).

>>> choose_jobs(cores=16, available_mib=126 * 1024, mem_per_job_gb=4)
(16, 'min(16 cores, 126 GiB available / 4 GiB per job = 31) = 16')
>>> choose_jobs(cores=4, available_mib=10 * 1024, mem_per_job_gb=4)[0]
2
"""

from __future__ import annotations

from typing import Any


def choose_jobs(cores: Any, available_mib: Any, mem_per_job_gb: int, configured: int = 0) -> tuple[int, str]:
    """(jobs, why). `cores`/`available_mib` may be facts.UNKNOWN (any non-int): then the other bound
    decides, and with neither known the build runs 2 jobs (safe on any box that can build at all)."""
    if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
        return configured, f"build.jobs = {configured} (configured)"
    have_cores = isinstance(cores, int) and not isinstance(cores, bool) and cores > 0
    have_mem = isinstance(available_mib, int) and not isinstance(available_mib, bool) and available_mib > 0
    per_job_mib = max(1, int(mem_per_job_gb)) * 1024
    by_mem = max(1, available_mib // per_job_mib) if have_mem else None
    if have_cores and by_mem is not None:
        jobs = max(1, min(cores, by_mem))
        return jobs, (f"min({cores} cores, {available_mib // 1024} GiB available / {mem_per_job_gb} GiB per job"
                      f" = {by_mem}) = {jobs}")
    if have_cores:
        jobs = max(1, min(cores, 2))
        return jobs, f"available memory unknown: {jobs} jobs of {cores} cores, to stay clear of OOM kills"
    if by_mem is not None:
        return by_mem, f"core count unknown: {available_mib // 1024} GiB available / {mem_per_job_gb} GiB per job = {by_mem}"
    return 2, "cores and memory unknown: 2 jobs"
