"""The tools layer: catalog, info, verify, gc, copy, convert and the checkpoint manager.

What the ``dcp-cloud`` command and the public helpers do with whole checkpoints, built on the
layers below (save, load, checkpoint, store).
"""
