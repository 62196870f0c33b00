"""The checkpoint layer: what a checkpoint is on a store.

Its key layout, the manifest (schema-validated), the ``.metadata`` pickle read by a restricted
unpickler and checked field by field, the rules for non-tensor items and ``torch.save``
archives, the confinement of every key a checkpoint's own files name, and ownership: reading,
committing, retiring and discarding saves. Built on :mod:`dcp_cloud.store` alone; it knows
nothing of how a save packs items or how a load fetches them.
"""
