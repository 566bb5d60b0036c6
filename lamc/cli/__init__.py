"""The `lamc` command line."""
