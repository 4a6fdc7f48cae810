"""Benchmarks for shardps: each module answers one question, with its baseline in the same run."""
