"""The shard actor (:mod:`.actor`) and the plain parts it holds: dense buffers, table rows, the replica
protocol, crash recovery. Each part is testable without Ray."""
