"""Build DeepSpeed's JIT ops (CPU Adam, async IO, shared-memory comm, pinned memory) before the suite runs.

DeepSpeed compiles them on first use under a lock file; a test killed by its timeout in the middle of that
compile leaves the lock behind, and every later test that needs the op waits on it. Built here, outside any
test's timeout, the tests only load them. An op that cannot build on this machine is reported and skipped
(the tests that need it skip or say why).

    python tests/build_deepspeed_ops.py
"""

from __future__ import annotations

import time

OPS = ("CPUAdamBuilder", "AsyncIOBuilder", "ShareMemCommBuilder", "PinMemoryBuilder")


def main() -> None:
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        print("deepspeed is not installed: nothing to build")
        return
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"{name}: cannot build here, skipped")
            continue
        start = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as e:  # the tests that need it fail with the whole error; the rest still run
            print(f"{name}: build failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        print(f"{name}: {builder.NAME} ready ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
