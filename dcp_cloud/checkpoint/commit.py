"""The commit protocol: committing a save, discarding one that lost, retiring old generations.

Data flow: before committing, the coordinator reads the committed metadata its save replaces
(:meth:`StoredCheckpoint.read_replaced`). :func:`commit` records in the new manifest what that
checkpoint needs (``replaced``), PUTs the manifest and then ``.metadata``, the commit (a
conditional PUT when not overwriting). A save that finds a checkpoint there with
overwrite=False, or loses the conditional PUT to another writer, is deleted (:func:`discard`)
and raises :class:`CheckpointExistsError`. After the commit, :func:`release_intent` deletes the
save's intent record and :func:`retire_generation_before` deletes the generation the replaced
checkpoint had itself replaced: only keys that its save records (:mod:`.ownership`) prove
dcp_cloud wrote and neither committed ``.metadata`` names. Everything after the commit is best
effort: failures are logged and left for gc. :class:`StoredCheckpoint` exposes each step.
"""

from __future__ import annotations

import logging
import pickle

from torch.distributed.checkpoint.metadata import Metadata

from ..errors import DcpCloudError
from ..store.keys import join
from . import layout
from .confine import is_confined
from .manifest import Manifest
from .ownership import read_save
from .stored import StoredCheckpoint

logger = logging.getLogger("dcp_cloud")


def commit(
    stored: StoredCheckpoint,
    name: str,
    manifest: Manifest,
    metadata: Metadata,
    *,
    overwrite: bool,
    previous: Metadata | None,
) -> None:
    """Commit a save: its ``manifest``, then ``metadata`` as the metadata object ``name``.

    ``previous`` is the committed metadata the save replaces (read before, see
    :meth:`StoredCheckpoint.read_replaced`); the manifest records the keys it needs.

    Raises:
        CheckpointExistsError: when not ``overwrite``, a checkpoint was committed already, or
            another writer committed first; the save's objects are deleted either way.
        DcpCloudError: the conditional PUT found an object there that could not be read back,
            so whether it is this save's own is unknown; nothing is deleted.
    """
    store = stored.store
    if previous is not None and not overwrite:
        discard(stored, manifest)
        raise stored.exists_error(name)
    if previous is not None:
        manifest.replaced = StoredCheckpoint.referenced_keys(previous)
    store.run(store.put(stored.key(layout.manifest_key(manifest.save_id)), manifest.to_json()))
    body = pickle.dumps(metadata, protocol=4)  # unique to this save: it names the save id
    try:
        store.run(store.put(stored.key(name), body, if_absent=not overwrite))
    except FileExistsError:
        # Either another writer committed first, or our own PUT landed and only its answer was
        # lost, so that a retry found it: only in the first case may this save's objects go.
        try:
            ours = stored.read_committed(name) == body
        except Exception as exc:  # cannot tell: never delete what may be committed
            raise DcpCloudError(
                f"{stored.where(name)} already existed when this save committed, and reading it "
                f"back failed ({exc}), so whether this save committed is unknown. Load the "
                "checkpoint to find out; `dcp-cloud gc` removes this save's objects if it did not."
            ) from exc
        if ours:
            return
        discard(stored, manifest)
        raise stored.exists_error(name) from None


def discard(stored: StoredCheckpoint, manifest: Manifest) -> None:
    """Delete a save's objects after it lost the commit (best effort; gc finds the rest)."""
    names = sorted(manifest.objects) + [
        layout.manifest_key(manifest.save_id),
        layout.intent_key(manifest.save_id),
    ]
    try:
        stored.store.run(stored.store.delete([stored.key(n) for n in names]))
    except Exception as exc:
        logger.warning(
            "%s: could not remove the objects of the save that did not commit: %s", stored.store.url, exc
        )


def release_intent(stored: StoredCheckpoint, save_id: str) -> None:
    """After the commit: the committed ``.metadata`` and the manifest now speak for the save.
    The caller stops renewing the lease first."""
    try:
        stored.store.run(stored.store.delete([stored.key(layout.intent_key(save_id))]))
    except Exception as exc:
        logger.warning(
            "%s: the checkpoint is committed, but removing its intent record failed (%s); "
            "it expires on its own",
            stored.store.url,
            exc,
        )


def retire_generation_before(stored: StoredCheckpoint, previous: Metadata, current: Metadata) -> None:
    """Delete what the replaced checkpoint had itself replaced; never raises.

    The checkpoint just replaced stays whole, so a load that read its ``.metadata`` before
    this commit still finishes with that version; the one before it goes now, but only the
    objects its own save records prove dcp_cloud wrote and neither ``.metadata`` names.
    Anything else (a garbled or crafted manifest, a failed request) is logged and left for gc.
    """
    try:
        doomed = older_generation(stored, previous, current)
        if doomed:
            stored.store.run(stored.store.delete(doomed))
    except Exception as exc:
        logger.warning(
            "%s: the new checkpoint is committed, but cleaning up an older one failed (%s); "
            "`dcp-cloud gc` removes what is left",
            stored.store.url,
            exc,
        )


def older_generation(stored: StoredCheckpoint, previous: Metadata, current: Metadata) -> list[str]:
    """Store keys of the generation before ``previous`` that are provably ours, data first and
    each save's records last."""
    previous_id = StoredCheckpoint.claimed_save_id(previous)
    if previous_id is None or not layout.is_save_id(previous_id):
        return []  # not written by dcp_cloud: nothing recorded about what it replaced
    store, folder = stored.store, stored.folder
    recorded = read_save(store, folder, previous_id, intent=False)
    if recorded.manifest is None:
        return []
    keep = StoredCheckpoint.referenced_keys(current) | StoredCheckpoint.referenced_keys(previous)
    by_save: dict[str, list[str]] = {}
    for key in recorded.manifest.replaced:
        save_id = layout.save_id_of_key(key) if is_confined(key) else None
        if save_id is None or key in keep:
            if key not in keep:
                logger.warning("%s: not deleting %r: not a key of a save of ours", store.url, key)
            continue
        by_save.setdefault(save_id, []).append(join(folder, key))
    doomed: list[str] = []
    records: list[str] = []
    for save_id, keys in sorted(by_save.items()):
        # a save that an older .metadata committed: its manifest is its record
        save = read_save(store, folder, save_id, intent=False)
        owned = sorted(k for k in keys if save.accounts_for(k))
        doomed += [k for k in owned if k not in save.record_keys()]
        records += [k for k in owned if k in save.record_keys()]
    return doomed + records
