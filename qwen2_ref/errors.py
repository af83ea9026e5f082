"""User-facing errors: one line that names the file, tensor or flag and says how to fix it.

The CLIs print these as `error: <message>` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path


class Qwen2Error(Exception):
    """Bad input from the user (a file, a flag, a config); never an internal invariant."""


class ConfigError(Qwen2Error):
    """A model configuration is invalid or inconsistent."""


class CheckpointError(Qwen2Error):
    """A checkpoint is missing, unreadable, or does not match the configuration."""


def read_json(path: Path) -> object:
    """A JSON file a user gave us, or a CheckpointError naming it (unreadable, not UTF-8, not JSON, too deep)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to be a config") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
