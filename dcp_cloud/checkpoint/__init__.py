"""The checkpoint layer: what a checkpoint is on a store.

Its key layout, the manifest (schema-validated), the ``.metadata`` pickle read by a restricted
unpickler and checked field by field, the rules for non-tensor items and ``torch.save``
archives, the confinement of every key a checkpoint's own files name, ownership records, and
:class:`~dcp_cloud.checkpoint.stored.StoredCheckpoint`: a checkpoint as it lies on a store, read
in one way and committed, retired and discarded through the protocol in
:mod:`dcp_cloud.checkpoint.commit`. Built on :mod:`dcp_cloud.store` alone; it knows
nothing of how a save packs items or how a load fetches them.
"""
