"""The save layer: DCP's ``StorageWriter`` and what it needs.

Packing the planner's items into objects and streaming those objects to the store, then
committing the save through :mod:`dcp_cloud.checkpoint`. Knows nothing of a particular cloud.
"""
