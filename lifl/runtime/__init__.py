"""Runtimes execute the control plane's decisions: start, message and stop aggregator functions."""
