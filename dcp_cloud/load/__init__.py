"""The load layer: DCP's ``StorageReader`` and what it needs.

Planning which byte ranges serve which ``ReadItem`` (each route decided once), fetching them
within a memory budget, and decoding them into the planner's tensors. Knows nothing of a
particular cloud.
"""
