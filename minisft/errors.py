"""Errors a user acts on; each message is printable as is (the CLI prints it on one line, exit code
2, or 3 for a diverged run). They live apart so a command imports only what it uses: `chat`
never loads the training stack just to report a bad flag."""


class ConfigError(ValueError):
    """A user's configuration mistake; the message is meant to be printed as is."""


class TrainingError(RuntimeError):
    """The run cannot go on as asked; the message says why and what to do, printable as is."""


class DivergedError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class CheckpointError(ValueError):
    """A model folder or file minisft cannot load as it is; the message says what is wrong and where."""


class UnreadableFileError(CheckpointError):
    """A file that cannot be read at all (truncated, corrupt, missing): `--resume` falls back to the
    previous checkpoint, where a readable but wrong value is an error to fix."""
