"""Snapshots of a running microVM: save it to a directory, restore it (once, or as many clones), in a warm
VMM or a new one.  docs/snapshot.md describes the files, the commands and what survives a restore."""
