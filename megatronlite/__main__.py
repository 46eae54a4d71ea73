"""`python -m megatronlite`: how `launch` (torchrun) and srun start every worker.

A command that succeeded (returned, or exited with code 0 as `launch` does) ends its process once the exit
hooks have run (threads joined; logging, wandb and multiprocessing shut down; output flushed), without the
interpreter's teardown after them: its last garbage collection walks torch's whole object graph, about half a
second of CPU in every worker of every job, to free memory the OS frees at once. A command that failed exits
the usual way, with its code.
"""

import atexit
import os
import sys


def _end_finished_command() -> None:
    if finished:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


finished = False
atexit.register(_end_finished_command)  # registered before anything else imports: it runs after every other hook

from megatronlite.cli import main  # noqa: E402 - after the hook above

try:
    main()
except SystemExit as e:
    if e.code not in (None, 0):
        raise
finished = True
