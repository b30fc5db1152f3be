"""The NBD server against real NBD clients."""
