"""THE BASELINE: Ray's original single-actor parameter server, as in its example.

A dict of arrays in one actor; ``push`` adds each value to its key, ``pull``
returns a list. Kept verbatim in spirit (plus a no-op ``ping``) so shardps is
measured against what it replaces.
"""


class BaselineServer:
    def __init__(self, keys, values):
        values = [value.copy() for value in values]
        self.weights = dict(zip(keys, values))

    def push(self, keys, values):
        for key, value in zip(keys, values):
            self.weights[key] += value

    def pull(self, keys):
        return [self.weights[key] for key in keys]

    def ping(self):
        return None
