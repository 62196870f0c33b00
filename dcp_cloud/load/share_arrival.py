"""Meeting the peers of a shared read: who arrived, and an error that says who did not.

Every rank of a sharing group announces itself under the load's secret token in the default
process group's store, with a short value of its own (where it can exchange bytes through shared
memory), and waits for the others' announcements. A rank that failed before reading (its planner
raised) or that does not share (it passed another ``share_reads``) never announces itself: the
others then raise, after ``share_timeout``, an error that names it and says what to do, instead
of a bare collective timeout.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..errors import PeerReadError

_PREFIX = "dcp_cloud/share/"


def absent_message(missing: list[int], timeout: float, step: str) -> str:
    """What to say when ``missing`` ranks (empty: unknown ones) did not take part in ``step``."""
    if not missing:
        who = "a rank of the load"
    elif len(missing) == 1:
        who = f"rank {missing[0]}"
    else:
        who = "ranks " + ", ".join(map(str, missing))
    return (
        f"{who} did not reach {step} within share_timeout={timeout:g} s: a rank failed before "
        "loading (see that rank's own error), or the ranks passed different share_reads (every "
        "rank of a load must pass the same). Fix that rank's error or the setting, and load again."
    )


def meet_peers(ranks: tuple[int, ...], me: int, token: str, timeout: float, value: str) -> dict[int, str]:
    """Announce ``value`` for rank ``me`` and return every rank's, once all of ``ranks`` have
    announced theirs; raise :class:`PeerReadError` naming the ranks that did not within
    ``timeout`` seconds."""
    store: Any = dist.distributed_c10d._get_default_store()
    keys = [f"{_PREFIX}{token}/{r}" for r in ranks]
    store.set(keys[ranks.index(me)], value)
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception:  # the store raises DistStoreError (or RuntimeError) when it gives up
        # (this rank's own announcement stays: a peer still waiting would count it missing)
        missing = [r for r, key in zip(ranks, keys) if not store.check([key])]
        if not missing:
            raise
        raise PeerReadError(absent_message(missing, timeout, "the shared read"), missing[0]) from None
    values = store.multi_get(keys)
    return {r: bytes(v).decode() for r, v in zip(ranks, values)}


def leave(token: str, me: int) -> None:
    """Drop this rank's announcement (every peer has read it once the next collective is done)."""
    store: Any = dist.distributed_c10d._get_default_store()
    try:
        store.delete_key(f"{_PREFIX}{token}/{me}")
    except Exception:  # noqa: BLE001 - a store without deletes keeps a few bytes
        pass
