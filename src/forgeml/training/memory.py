"""Process memory settings for training on CPU.

glibc's malloc hands large freed blocks back to the kernel (munmap, heap trimming), so the next
step's activations and gradients of the same sizes come back as fresh pages, each one faulted in
and zeroed: on the `lm` recipe's model that was 15,000 page faults and 5-8 % of every step.
Keeping freed memory for reuse removes them. jemalloc or tcmalloc would do the same, but only
through LD_PRELOAD before Python starts; ``mallopt`` does it from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_FREE = 1 << 30  # free heap kept before trimming: 1 GiB
MMAP_ABOVE = 32 << 20  # blocks served from the heap up to glibc's maximum of 32 MiB


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; returns whether it could (False off glibc).
    The process's resident memory then stays near its peak, which a training process reaches
    on its first step anyway."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE)) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE))
