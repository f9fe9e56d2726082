"""Errors the CLI turns into one sentence and an exit code (never a traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (study file, task file, model path, port, plugin). Exit code 2."""

    exit_code = 2


class RunError(Exception):
    """A run could not continue (dead server after retries, ...). Records written so far are kept. Exit code 1."""

    exit_code = 1


class PluginError(UserError):
    """A plugin could not be loaded or registered (names the plugin and its distribution)."""
