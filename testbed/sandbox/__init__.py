"""The gpubox sandbox: a Fedora-42-like host named `gpubox` on a Debian machine, for the demo and tests.

What it is: a Debian sid root made with debootstrap (real dnf5 5.4, rpm 6.1, systemd 262, sshd, python3,
git, cmake, ninja, ccache, gcc-14/g++-14 and gcc-15/g++-15 as the default gcc) that reports itself as
Fedora 42 through fixture RPMs and boots its systemd as PID 1 under systemd-nspawn, in its own network
namespace (sshd is its ssh.service; docs/systemd.md). What it is not: Fedora, a GPU host, RPM Fusion or
NVIDIA's repository; no kernel modules load and nothing reboots. Stand-ins exist only for what no
container can have (nvidia-smi, nvcc, akmods) and ship inside the fixture packages where the real
packages put them.

Layout under ``${GPUBOX_CACHE:-~/.cache/gpubox}/sandbox`` (the cache; `down` leaves it):

    debs/          debootstrap's --cache-dir (downloaded .debs)
    base/          the debootstrap rootfs (recipe: suite, package list; mirror: the host's apt sources)
                                                                                 -- minutes, cold
    pristine/      overlay layer over base: fixture RPMs installed, sshd, keys   -- ~30 s
    repos/         fixture RPM repositories {fedora,rpmfusion,updates,cuda}      -- ~30 s
    git/           llama.cpp.git, from the llama-cpp-python sdist, fixed author/date (stable SHA)
    hf/            the local Hugging Face server's content (<org>/<name>/<file>)
    persist/       survives `reset`: mounted at /var/cache/gpubox-persist in the target
    instance/      the running sandbox's writable layer (upper); `reset` drops it
    instances/     the same for each host of a fleet (`up --hosts N`: instances/gpubox1 ...)
    fleet.json     what `up --hosts N` started (hosts, PIDs, the fleet's HF server)
    ssh/           the client key pair, the ssh config (`Host gpubox`), the ControlMaster sockets
    invoke.yaml    config overrides (`gpubox:` mapping) for running gpubox against the sandbox
    state.json     what `up` started: PIDs, addresses, URLs

Inside the target:

    /srv/gpubox-repos/{fedora,rpmfusion,updates,cuda}   file:// repositories (read-only)
    /srv/git/llama.cpp.git                              the llama.cpp mirror (read-only)
    /var/cache/gpubox-persist                           PERSIST_MOUNT: survives reset; ccache's
                                                        cache_dir is /var/cache/gpubox-persist/ccache
                                                        (set in /etc/ccache.conf), so a rebuild after
                                                        `reset` is a ccache hit

Network: namespace `gpubox`, host side 10.200.0.1/24, target 10.200.0.2/24 (ssh root@10.200.0.2,
key only); names and addresses: paths.TARGET. A fleet's host k: namespace gpubox<k>, 10.200.<k>.1/.2
(paths.fleet_target), booted beside `gpubox` from the same layers; docs/fleet.md. The Hugging Face server listens on the host side
(10.200.0.1), reachable from both.

Use: `invoke sandbox.up | sandbox.status | sandbox.reset | sandbox.down`, `invoke demo`;
from Python `testbed.sandbox.up()` -> `Info`.
"""

from .paths import ADDRESS, HOST_ADDRESS, NETNS, PERSIST_MOUNT, REPO_MOUNT, GIT_MOUNT, TARGET, Paths  # noqa: F401
from .runtime import Info, SandboxError, down, ensure_built, info, leftovers, reset, status, up  # noqa: F401
from .runtime import FleetInfo, down_fleet, fleet_info, fleet_running, reset_fleet, up_fleet  # noqa: F401
