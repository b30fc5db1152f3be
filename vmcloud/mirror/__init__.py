"""Copy-on-reference local disks: one mirror per instance over one image version."""
