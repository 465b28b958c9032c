"""
The package as pip installs it: every sub-package of C{cloud_console} is listed in
pyproject.toml (setuptools installs only the packages named there; the tests run from
the checkout, where a missing one would go unnoticed until an installed server fails to
import it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class PackagesListedTests(SynchronousTestCase):
    def test_every_subpackage_is_installed(self) -> None:
        listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
        found = {
            ".".join(init.parent.relative_to(ROOT).parts)
            for init in (ROOT / "cloud_console").rglob("__init__.py")
        }
        self.assertEqual(found - listed, set(), "sub-packages pip would leave out")
        self.assertIn("twisted.plugins", listed)
