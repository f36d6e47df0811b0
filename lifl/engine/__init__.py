"""The aggregation engine: the pure reduction of a round and the mechanisms that run it."""
