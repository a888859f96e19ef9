"""The maintctl command line."""
