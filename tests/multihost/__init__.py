"""Tests and tools that emulate several hosts on one machine (network namespaces)."""
