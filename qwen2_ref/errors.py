"""User-facing errors: one line that names the file, tensor or flag and says how to fix it.

The CLIs print these as `error: <message>` and exit with status 2; anything else is a bug and keeps its traceback.
"""


class Qwen2Error(Exception):
    """Bad input from the user (a file, a flag, a config); never an internal invariant."""


class ConfigError(Qwen2Error):
    """A model configuration is invalid or inconsistent."""


class CheckpointError(Qwen2Error):
    """A checkpoint is missing, unreadable, or does not match the configuration."""
