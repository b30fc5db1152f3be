"""The dispatcher: API entry, scheduler and global manager of the cloud."""
