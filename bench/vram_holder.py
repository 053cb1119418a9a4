#!/usr/bin/env python3
"""Make a big GPU look like a small one: allocate all but LEAVE MiB of device 0 with torch, then sleep.

    setsid python3 bench/vram_holder.py 8192 READY_FILE [PARENT_PID [MAX_SECONDS]] &   # then: kill <pid>

Plain device allocations in chunks (1 GiB, then smaller) until the free memory the driver reports
(cudaMemGetInfo, what nvidia-smi shows too) is within 2 MiB above LEAVE; READY_FILE then receives
"free_mib total_mib pid". It holds the memory until it gets SIGTERM/SIGINT, or PARENT_PID is gone, or
MAX_SECONDS (default 900) have passed: a benchmark killed by a time limit cannot leave the GPU capped.
"""

import os
import signal
import sys
import time

MIB = 1 << 20


def main() -> int:
    leave = int(sys.argv[1]) * MIB
    ready = sys.argv[2]
    parent = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    deadline = time.monotonic() + (float(sys.argv[4]) if len(sys.argv) > 4 else 900.0)
    import torch

    torch.cuda.init()
    bufs = []
    chunk = 1 << 30
    while True:
        free, total = torch.cuda.mem_get_info(0)
        excess = free - leave
        if excess < 2 * MIB:
            break
        size = min(chunk, excess)
        try:
            bufs.append(torch.empty(size, dtype=torch.uint8, device="cuda:0"))
        except RuntimeError:
            chunk //= 2
            if chunk < 2 * MIB:
                break
            continue
        if size < chunk:
            chunk = max(2 * MIB, size // 2)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(0)
    with open(ready + ".tmp", "w") as fh:
        fh.write(f"{free // MIB} {total // MIB} {os.getpid()}\n")
    os.replace(ready + ".tmp", ready)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    while not stop and time.monotonic() < deadline:
        if parent:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                break
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
