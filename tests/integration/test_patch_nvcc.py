"""Step 4 proven RIGHT, not just applied: nvcc compiles against glibc 2.41 with the patched header.

CUDA 12.9's own nvcc is not on PyPI or apt, so this is the reproduction recorded in
docs/platform.md: CUDA 13.0's nvcc run inside a Debian trixie chroot (glibc 2.41,
g++-14), with its crt/math_functions.h/.hpp replaced by the real 12.9.86 ones (PyPI wheel
nvidia-cuda-nvcc-cu12==12.9.86). The same translation unit: fails with the four "exception
specification is incompatible" errors unpatched; compiles, links and runs with gpubox's patch and
with the recipe's hand edit; a split pair fails with "different exception specifier".

Needs root, a CUDA 13 toolkit (/usr/local/cuda-13.0 or GPUBOX_CUDA13) and the trixie chroot (built
once with debootstrap into $GPUBOX_CACHE/trixie). Skips with the reason otherwise.
"""

from __future__ import annotations

import re

import pytest

from provision import config
from provision.steps import patch

import nvcc_chroot as nc  # tests/integration is on sys.path (rootdir conftest import mode)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE = r"""
#include <cmath>
#include <cstdio>
__global__ void k(float *o, double *p, float x, double y)
{
    o[0] = sinpif(x) + cospif(x) + rsqrtf(x);
    p[0] = sinpi(y) + cospi(y) + rsqrt(y);
}
int main()
{
    volatile float x = 0.25f;
    volatile double d = 4.0;
    std::printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", sinpif(x), cospif(x), sinpi((double)x), cospi((double)x),
                rsqrt(d), rsqrtf(4.0f));
    return 0;
}
"""
EXPECTED_RUN = "0.7071 0.7071 0.7071 0.7071 0.5000 0.5000"

FUNCS = {"rsqrt": "double", "rsqrtf": "float", "sinpi": "double", "sinpif": "float", "cospi": "double",
         "cospif": "float"}


@pytest.fixture(scope="module")
def trixie():
    why = nc.Trixie.unavailable()
    if why:
        pytest.skip(why)
    t = nc.Trixie().ensure()
    assert t.glibc() == "glibc 2.41"
    return t


@pytest.fixture(scope="module")
def headers():
    try:
        return nc.cuda129_headers()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def rs():
    return patch.rules_for(config.validate(config.defaults()["gpubox"]))


def recipe(text: str) -> str:
    for f, t in FUNCS.items():
        text, n = re.subn(rf"(__device_builtin__ +{t} +{f}\({t} x\));", r"\1 noexcept (true);", text)
        assert n == 1
        text = text.replace(f"__func__({t} {f}({t} a));", f"__func__({t} {f}({t} a) throw());")
    return text


def test_unpatched_header_fails_with_exception_specification_incompatible(trixie, headers):
    h, hpp = headers
    r = trixie.compile(SOURCE, h, hpp)
    assert r.rc != 0
    errors = re.findall(r'error: exception specification is incompatible with that of previous function "(\w+)" '
                        r"\(declared at line (\d+) of [^)]*crt/math_functions.h\)", r.output)
    assert sorted(errors) == [("cospi", "2601"), ("cospif", "2623"), ("sinpi", "2556"), ("sinpif", "2579")], r.output


def test_gpubox_patched_header_compiles_links_and_runs(trixie, headers, rs):
    h, hpp = headers
    r = trixie.compile(SOURCE, patch.transform(h, rs), hpp)
    assert r.rc == 0, r.output
    assert "error" not in r.output
    assert r.ran.strip() == EXPECTED_RUN


def test_recipe_style_header_compiles_too(trixie, headers, rs):
    h, hpp = headers
    text = recipe(h)
    assert patch.analyze_text(text, rs).kind == "patched-recipe"
    r = trixie.compile(SOURCE, text, hpp)
    assert r.rc == 0, r.output
    assert r.ran.strip() == EXPECTED_RUN


def test_splitting_a_pair_fails_in_the_host_pass(trixie, headers, rs):
    """Why the rules change a device declaration and its host form together."""
    h, hpp = headers
    text = h
    for f, t in FUNCS.items():
        text = re.sub(rf"(__device_builtin__ +{t} +{f}\({t} x\));", r"\1 noexcept (true);", text)
    assert patch.analyze_text(text, rs).kind == "partial"
    r = trixie.compile(SOURCE, text, hpp)
    assert r.rc != 0
    assert "declaration of 'double rsqrt(double)' has a different exception specifier" in r.output.replace("‘", "'").replace("’", "'")


def test_preamble_gates_on_glibc_2_41(trixie, rs):
    """In the chroot (glibc 2.41): the 2.41 gate is noexcept, the 2.42 gate (rsqrt) is not yet."""
    src = ("\n".join(rs.preamble_lines()) + "\nvoid a() __GPUBOX_GLIBC_2_41_NOTHROW;\nvoid b() __GPUBOX_GLIBC_2_42_NOTHROW;\n"
           "static_assert(noexcept(a()), \"2.41\");\nstatic_assert(!noexcept(b()), \"2.42\");\n")
    r = trixie.gxx(src, "-std=c++17")
    assert r.returncode == 0, r.stdout + r.stderr


def test_patched_header_still_compiles_on_this_machines_older_glibc(headers, rs):
    """The gate leaves the specifiers empty below 2.41: the patched header is right on glibc 2.36 too
    (this machine's own glibc and g++, no chroot)."""
    why = nc.host_nvcc_unavailable()
    if why:
        pytest.skip(why)
    h, hpp = headers
    r = nc.compile_on_this_machine(SOURCE, patch.transform(h, rs), hpp)
    assert r.rc == 0, r.output
    assert r.ran.strip() == EXPECTED_RUN
