"""jam's Textual app (``jam tui``). Imported only by the CLI, only when the TUI starts: textual
is never loaded by ``jam --version`` or the cd hook. See app.py (``make_app``)."""
