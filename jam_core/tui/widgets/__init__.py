"""The TUI's widgets, one per file, each with its DEFAULT_CSS. Widgets never do I/O."""
