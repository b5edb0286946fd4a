"""Fails on import, as an app with a missing dependency or a typo at module level does."""

raise RuntimeError("this ServerApp module fails on import")
