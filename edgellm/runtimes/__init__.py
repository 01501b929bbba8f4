"""Backends (one file each) behind the Runtime protocol, and the shared decode loop."""
