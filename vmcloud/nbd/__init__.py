"""An NBD server (fixed newstyle) for the disks vmcloud serves to hypervisors."""
