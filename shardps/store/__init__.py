"""The parameter server: shard actors, the client-side Router, tables, checkpoints.

Layers, bottom up (each imports only those below it; nothing here imports
:mod:`shardps.training`, the CLI or the benchmarks):

- ``ids``, ``initializers``, ``optim``, ``wire``, ``dedup``, ``errors``: pure pieces.
- ``placement``: which shard holds which key range or table row; cut and gather whole tensors.
- ``update``: applying an optimizer to a buffer, over threads.
- ``shard/``: the ``ParameterShard`` actor and the plain parts it dispatches to.
- ``messages``: the wire forms of register / push / pull, built and read without Ray.
- ``checkpoint``: the file format only.
- ``handle``, ``router``, ``tables``, ``cluster``: the client, and ``launch()`` / ``restore()``.
"""
