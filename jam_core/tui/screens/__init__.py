"""The TUI's screens, one per file: main (the listing), tiers, help, confirm."""
