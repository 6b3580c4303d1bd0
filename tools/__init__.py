"""Shared machinery: everything the per-config network files and the entry scripts have in common."""
