"""Persistence: the insight graph (Bolt), the embedded graph server, SQL run metadata."""
