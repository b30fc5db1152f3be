"""vmcloud: deploy and snapshot many virtual machines at once from one image."""
