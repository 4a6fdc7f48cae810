"""Training on the store: :func:`~shardps.training.run.train`, its config, data, models and loops.

Named ``training`` (not ``train``) so that ``shardps.train`` stays the function: importing a
subpackage binds its name on the parent package and would shadow it.
"""
