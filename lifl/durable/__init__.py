"""Durable mode (``durable_dir``): a write-ahead log and data files that let a restarted server
resume every round it acknowledged updates for. ``wal`` frames records, ``journal`` is the hook
the engine calls, ``recover`` replays the log into a fresh engine. docs/durability.md."""
from .journal import NO_JOURNAL, Journal, NoJournal

__all__ = ["NO_JOURNAL", "Journal", "NoJournal"]
