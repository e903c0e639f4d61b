"""Locating data files inside installed packages without importing them."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["MissingDataError", "INSTALL_HINT", "package_dir", "package_file"]

INSTALL_HINT = "bash scripts/install_data.sh"


class MissingDataError(ImportError):
    """A data or weights package/file needed by :mod:`mixquant.zoo` is not installed.

    The message names the command that installs it. It subclasses :class:`ImportError`
    (``ImportError`` and ``FileNotFoundError`` cannot share a subclass in CPython), so
    ``except ImportError`` or ``except MissingDataError`` both catch it.
    """


def _pip_cmd(pip_spec: str, force: bool = False) -> str:
    if pip_spec.startswith("pip "):
        return pip_spec.replace("pip install", "pip install --force-reinstall") if force else pip_spec
    return f"pip install --no-deps {'--force-reinstall ' if force else ''}{pip_spec}"


def package_dir(module: str, pip_spec: str) -> str:
    # pip_spec: "NAME==VER" (installed with --no-deps) or a full "pip install ..." command
    """Folder of the installed top-level package ``module``.

    Uses :func:`importlib.util.find_spec` on the top-level name, which locates the
    package without executing its ``__init__`` (several of these packages would fail
    to import, since they are installed with ``--no-deps``).
    """
    if "." in module:
        raise ValueError("package_dir takes a top-level module name")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"package '{module}' is not installed; install it with "
            f"`{_pip_cmd(pip_spec)}` (or run `{INSTALL_HINT}`)"
        )
    return os.fspath(list(spec.submodule_search_locations)[0])


def package_file(module: str, pip_spec: str, relpath: str) -> str:
    """Path of ``relpath`` inside the installed package ``module``; must exist."""
    path = os.path.join(package_dir(module, pip_spec), *relpath.split("/"))
    if not os.path.exists(path):
        raise MissingDataError(
            f"{path} is missing although '{module}' is installed; reinstall with "
            f"`{_pip_cmd(pip_spec, force=True)}` (or run `{INSTALL_HINT}`)"
        )
    return path
