"""Build DeepSpeed's JIT ops (CPU Adam, async IO, shared-memory comm, pinned memory) outside the tests.

DeepSpeed compiles them on first use under a lock file; a test killed by its timeout in the middle of that
compile leaves the lock behind, and every later test that needs the op waits on it. Built here, outside any
test's timeout, the tests only load them. An op that cannot build on this machine is reported and skipped
(the tests that need it skip or say why).

    python tests/build_deepspeed_ops.py [BUILDER ...]         # the named ones (default: all)
    python tests/build_deepspeed_ops.py --except BUILDER ...  # all but those

`make test` builds async IO (the slowest: minutes on two cores) while the tests run: only the NVMe-offload
tests load it, late in their files, and a process that loads an op being built waits on its lock until it is done.
"""

from __future__ import annotations

import sys
import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder", "PinMemoryBuilder", "AsyncIOBuilder")


def chosen(args: list[str]) -> list[str]:
    """The builders the command line names, in OPS' order."""
    unknown = set(args) - {"--except", *OPS}
    if unknown:
        raise SystemExit(f"unknown builder(s) {', '.join(sorted(unknown))}; builders: {', '.join(OPS)}")
    if args[:1] == ["--except"]:
        return [op for op in OPS if op not in args[1:]]
    return [op for op in OPS if op in args] if args else list(OPS)


def main(args: list[str]) -> None:
    names = chosen(args)
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        print("deepspeed is not installed: nothing to build")
        return
    for name in names:
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
        print(f"{name}: {builder.NAME} ready ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
