"""Errors a user fixes, shared by commands that must not import each other (`chat` never loads
the training stack just to report a bad flag)."""


class ConfigError(ValueError):
    """A user's configuration mistake; the message is meant to be printed as is."""
