"""The watchdog's rule, on a store of its own (tests/test_faults.py ends real jobs with it): in training a rank
without progress for the timeout is stalled; at start-up only a rank that stopped answering is."""

import threading
import time

import pytest
import torch.distributed as dist

from megatronlite.train import watchdog as watchdog_mod
from megatronlite.train.watchdog import Watchdog


def watched(tmp_path, monkeypatch, patient: bool, peer_alive_at: float) -> threading.Event:
    """A rank-0 watchdog (timeout 1 s) whose peer, rank 1, last said it was alive at `peer_alive_at`; set once it
    would have ended the job."""
    fired = threading.Event()
    monkeypatch.setattr(Watchdog, "_fire", lambda self, stalled_for: fired.set())
    dog = Watchdog(tmp_path, 0, 2, timeout_s=1.0)
    dog.store = dist.PrefixStore(watchdog_mod.PREFIX, dist.HashStore())
    dog.store.set("alive/1", repr(peer_alive_at))
    dog.patient = patient
    dog.threads = dog.threads[:1]  # the watch only: rank 0's own heartbeat is not what is judged
    with dog:
        fired.wait(timeout=3.0)
    return fired


@pytest.mark.parametrize(
    "patient, peer, patience, fires",
    [
        (False, "answering", 6, True),  # training: no progress for the timeout is a stall
        (True, "answering", 6, False),  # start-up: a slow peer (an index build) is waited for
        (True, "stopped", 6, True),  # start-up: a frozen or dead one ends the job
        (True, "answering", 2, True),  # ... and nothing is waited for past the patience (a stale build lock)
    ],
)
def test_start_up_waits_for_slow_ranks_and_not_for_stopped_ones(tmp_path, monkeypatch, patient, peer, patience, fires):
    monkeypatch.setattr(watchdog_mod, "PATIENCE", patience)
    alive_at = time.time() + 3600 if peer == "answering" else time.time() - 3600
    assert watched(tmp_path, monkeypatch, patient, alive_at).is_set() == fires
