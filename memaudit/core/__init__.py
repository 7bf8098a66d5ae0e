"""The floor every other layer of memaudit stands on: errors, atomic file writes, devices, provenance, content
digests, run identities, output folders and plugin discovery. Nothing here imports another memaudit package."""
