"""Errors the CLI turns into one sentence and an exit code (never a traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (study file, task file, model path, port, plugin). Exit code 2."""

    exit_code = 2


class RunError(Exception):
    """A run could not continue (dead server after retries, ...). Records written so far are kept. Exit code 1."""

    exit_code = 1


def user_path(text: str, what: str):
    """``Path(text).expanduser()``; a ``~user`` that does not exist or a name the OS refuses (too long) becomes one
    UserError sentence instead of a RuntimeError / OSError traceback."""
    from pathlib import Path

    try:
        path = Path(text).expanduser()
        path.exists()
    except RuntimeError:
        raise UserError(f"{what} {text!r} starts with ~ but no user of that name has a home here; write the full "
                        f"path") from None
    except OSError as exc:
        shown = text if len(text) <= 80 else text[:60] + "..."
        raise UserError(f"{what} {shown!r} cannot be used ({exc.strerror}); check the path") from None
    return path


class PluginError(UserError):
    """A plugin could not be loaded or registered (names the plugin and its distribution)."""
