"""The gateway: HAProxy in front of the applications' instances, programmed at runtime."""
