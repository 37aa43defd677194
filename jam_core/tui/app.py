"""The Textual app behind ``jam tui``: global bindings and the factory the CLI and tests use.

Layout (STYLE.md): screens/ one file per screen (main, tiers, help, confirm), widgets/ one per
widget with its DEFAULT_CSS, messages.py the dataclass messages workers post, jam.tcss the
app's own styles. Everything that touches files is a call of jam_core's library functions,
made in thread workers by the screens."""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from jam_core.tui.screens.main import MainScreen


class JamApp(App[int]):
    CSS_PATH = "jam.tcss"
    TITLE = "jam"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?", id="jam.help"),
        Binding("q", "quit_jam", "Quit", id="jam.quit"),
    ]

    def __init__(self, root, pm, rel: str = ".") -> None:
        super().__init__()
        self.root = root
        self.pm = pm
        self.start_rel = rel
        self.notices: list[tuple[str, str]] = []  # (severity, text) of every notification shown

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.root, self.pm, self.start_rel))

    def notify(self, message: str, *, title: str = "", severity="information", timeout=None,
               markup: bool = False) -> None:
        self.notices.append((severity, f"{title}: {message}" if title else message))
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def action_help(self) -> None:
        if isinstance(self.screen, MainScreen):
            self.push_screen(self.screens_ready().help)

    def screens_ready(self):
        """The help and tiers screens, made once and kept (installed): pressing ``?`` or ``t``
        again shows the same screen instead of building and styling a new one."""
        from jam_core.tui.screens.help import HelpScreen
        from jam_core.tui.screens.tiers import TiersScreen

        if not self.is_screen_installed("help"):
            keys = [b for b in MainScreen.BINDINGS if b.id != "jam.escape"] + list(self.BINDINGS)
            self.install_screen(HelpScreen(keys), "help")
            self.install_screen(TiersScreen(self.root, self.pm), "tiers")
        return _Screens(self.get_screen("help"), self.get_screen("tiers"))

    def action_quit_jam(self) -> None:
        main = next((s for s in self.screen_stack if isinstance(s, MainScreen)), None)
        if main is not None and main.session is not None:
            main.session.cancel()  # what finished stays finished; the rest stays as it was
        self.exit(0)


class _Screens:
    def __init__(self, help, tiers) -> None:
        self.help, self.tiers = help, tiers


def make_app(root, rel: str = ".", pm=None) -> JamApp:
    """The app for ``root`` (a ``jam_core.root.Root``) showing directory ``rel``; ``pm`` the
    plugin manager (built with ``make_plugin_manager()`` when None)."""
    if pm is None:
        from jam_core.manager import make_plugin_manager

        pm = make_plugin_manager()
    return JamApp(root, pm, rel)
