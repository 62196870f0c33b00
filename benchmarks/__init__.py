"""Side-by-side benchmark of DCP save and load: dcp_cloud against the other ways to do it.

Run from the repository root: ``python -m benchmarks --size-mib 1024 --rounds 3`` (the same as
``python -m benchmarks.bench`` and ``dcp-cloud bench``); benchmarks/README.md has the options,
the contenders and how to read the results.

Data flow: ``cli`` parses the command line and hands it to ``runner``, which opens the store
and its server (``endpoints``, with ``proxy``/``shaping``) and runs each measurement in a
fresh worker process (``worker``). The worker builds the seeded state dict (``workloads``),
saves or loads it with one contender (``contenders`` for the DCP writers and readers,
``ceilings`` for the raw ceiling and the transport) under ``measurement``'s timers and memory
sampler, and prints its figures as JSON. The parent adds the server's request counts, takes
medians and ratios over rounds (``summary``), checks the targets (``targets``), prints the
tables (``tables``) and writes ``results/<name>.json``, ``.md`` and ``.png`` (``report``,
``plots``). ``catalog`` holds the names all of them share.

``python -m benchmarks.fixed_cost`` (``fixed_cost``) is a separate measurement: the fixed cost of
a small save and load over one raw PUT and GET of the same bytes, in one warm process.
"""
