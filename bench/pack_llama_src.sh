#!/usr/bin/env bash
# Pack what bench/gpu_build.sh needs offline into .gpu/ (git-ignored), on a machine with PyPI/apt access:
#   .gpu/llama-src.tar.gz    llama.cpp as vendored by llama-cpp-python 0.3.36, stripped exactly like the
#                            sandbox's git mirror (provision/sandbox/gitmirror.py STRIP: no models/, docs/,
#                            .github/ ...), about 10 MB; no .git (gpu_build.sh commits it with the mirror's
#                            fixed author/date, so the commit SHA is the sandbox mirror's)
#   .gpu/llama-src.sha       that SHA, computed here the same way (gpu_build.sh checks it)
#   .gpu/debs/*.deb          Debian bookworm's ccache and libhiredis0.14 (Ubuntu 24.04 has no
#                            libhiredis0.14), unpacked there with dpkg -x only when the GPU machine lacks ccache
# Usage: bench/pack_llama_src.sh [SDIST]   (default: /tmp/setup/sdist/..., else ~/.cache/gpubox/..., else pip download)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/.gpu
mkdir -p "$dest/debs"
py=${PYTHON:-python3}
sdist=${1:-}
if [ -z "$sdist" ]; then
  for c in /tmp/setup/sdist/llama_cpp_python-0.3.36.tar.gz "${GPUBOX_CACHE:-$HOME/.cache/gpubox}/sandbox/sdist/llama_cpp_python-0.3.36.tar.gz"; do
    [ -f "$c" ] && { sdist=$c; break; }
  done
fi
if [ -z "$sdist" ]; then
  "$py" -m pip download --no-deps --no-binary=:all: -q -d "$dest" llama-cpp-python==0.3.36
  sdist=$dest/llama_cpp_python-0.3.36.tar.gz
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp" llama_cpp_python-0.3.36/vendor/llama.cpp
src=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -f "$src/.git"   # a submodule pointer file, not a repository
# The same list the sandbox mirror strips (one source of truth: the Python module).
(cd "$here" && "$py" -c 'from testbed.sandbox.gitmirror import STRIP; print("\n".join(STRIP))') | while read -r n; do
  [ -n "$n" ] && rm -rf "${src:?}/$n"
done
tar -C "$src" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 -czf "$dest/llama-src.tar.gz" .
# The commit, exactly as the mirror and gpu_build.sh make it.
(cd "$here" && "$py" - "$src" > "$dest/llama-src.sha") <<'PY'
import os, subprocess, sys
from testbed.sandbox.gitmirror import GIT_ENV
env = dict(os.environ, **GIT_ENV)
src = sys.argv[1]
for a in (["init", "-q", "-b", "master", "."], ["add", "-A", "."],
          ["commit", "-q", "-m", "llama.cpp as vendored by llama-cpp-python 0.3.36 (gpubox sandbox mirror)"]):
    subprocess.run(["git", *a], cwd=src, env=env, check=True)
print(subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=src, env=env, text=True).strip())
PY
# ccache for a GPU machine without it (apt-get download: the ordinary client, no root needed).
(cd "$dest/debs" && apt-get download ccache libhiredis0.14 >/dev/null 2>&1) || echo "note: apt-get download ccache failed; gpu_build.sh then needs ccache on the GPU machine" >&2
ls -la "$dest" "$dest/debs"
echo "sha $(cat "$dest/llama-src.sha"), $(du -h "$dest/llama-src.tar.gz" | cut -f1) source tarball"
