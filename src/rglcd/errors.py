"""The base of every error a user can fix: ``rglcd``'s commands print one as one line and exit with code 2."""


class RglcdError(Exception):
    """An error the user can fix: the CLI prints it as one line and exits 2 (``RGLCD_DEBUG=1`` shows its
    traceback). Each subclass also derives from the built-in error it used to be (ValueError, RuntimeError), so
    code that catches those still does."""
