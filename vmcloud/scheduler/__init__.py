"""Placement: filters and weighers run in a configured order, and consolidation policies."""
