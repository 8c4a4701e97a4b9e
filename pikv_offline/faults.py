"""Fault injection for the crash tests and benches: PIKV_FAULT=POINT:N[@RANK].

    PIKV_FAULT=commit:2 pikv dump-teacher ...        # SIGKILL right after this process's 2nd unit commit
    PIKV_FAULT=step:3@1 torchrun ... train-student   # rank 1 dies after optimizer step 3 (first attempt only)

Points: prepare:1 (the dump's data preparation process, at its start), forward:1 (before the dump's first forward), write:N / commit:N (after the N-th unit's data /
marker), complete:1 (before the dump's final commit), enospc:N (the N-th unit's write fails as on a
full disk: raises instead of killing), step:N (after training step N). Under torchrun's restarts a
fault fires on the first attempt only (TORCHELASTIC_RESTART_COUNT 0), so a restarted run can finish.
"""

from __future__ import annotations

import errno
import os
import signal


def fault(point: str, count: int) -> None:
    spec = os.environ.get("PIKV_FAULT", "")
    if not spec:
        return
    where, _, rank = spec.partition("@")
    if where != f"{point}:{count}" or (rank and rank != os.environ.get("RANK", "0")):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if point == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (PIKV_FAULT)")
    os.kill(os.getpid(), signal.SIGKILL)
