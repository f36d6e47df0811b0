"""A Flower app that uses LIFL for aggregation (see ../README.md)."""
