"""Optional dependencies: a missing one is one line naming the extra that installs it, never a traceback.

A plain `pip install megatronlite` has what training needs; the extras in pyproject.toml
(`[project.optional-dependencies]`) add what single features use. Import those here, at the point
of use, so the message names the feature and the exact command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from megatronlite.errors import UserError


def install_hint(extra: str) -> str:
    """The command that installs `extra`, quoted for a shell (brackets are glob characters)."""
    return f"pip install 'megatronlite[{extra}]'"


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` for the feature `what` (e.g. "convert --from hf"); if it is not installed, a UserError
    naming the extra. A module that is installed but fails to import itself is not hidden: that error stays."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        raise UserError(f"{what} needs {module.partition('.')[0]}: {install_hint(extra)}") from None
