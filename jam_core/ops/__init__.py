"""The operations: stash, checkout, status, doctor, remotes, demo, and the pipeline they share.

Each is a library function that the CLI, the TUI and tests call.
"""
