"""
Build hook: the terminal page is built with npm before the package data is copied.

Everything else is in pyproject.toml. The page's sources are in C{static/}; C{npm run
build} writes C{index.html}, C{app.js}, C{app.css} and fonts into
C{cloud_console/web_assets/} in the source tree, which pyproject.toml lists as package
data and the server finds with importlib.resources.

The build is a sub-command of C{build} (so it runs for C{pip install .}, wheels, and
editable installs, whose C{build_py} errors setuptools turns into warnings), of
C{build_py} (run alone) and of C{sdist} (so an sdist carries the built page and builds
without Node.js). From a tree without C{static/} (an unpacked sdist) the page already
built is used as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import ExecError

ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"
ASSETS = ROOT / "cloud_console" / "web_assets"

NO_NPM = """\
cloud-console: building the terminal page needs Node.js (18 or later) and npm, and
`npm` is not on PATH. Install them (for instance `apt-get install nodejs npm`) and
try again; the page's dependencies come from the npm registry, pinned by
static/package-lock.json."""


class build_web_assets(Command):
    """Run C{npm ci} (when the installed modules are missing or stale) and C{npm run build}."""

    description = "build the terminal page into cloud_console/web_assets with npm"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        if not (STATIC / "package.json").is_file():
            if (ASSETS / "index.html").is_file():
                self.announce("no static/ sources: using the page already built", level=2)
                return
            raise ExecError(f"cloud-console: neither static/ sources nor a built page in {ASSETS}")
        npm = shutil.which("npm")
        if npm is None:
            raise ExecError(NO_NPM)
        if self._modules_stale():
            self._npm(npm, "ci", "--no-audit", "--no-fund")
        self._npm(npm, "run", "build", "--", str(ASSETS))
        if not (ASSETS / "index.html").is_file():
            raise ExecError(f"cloud-console: npm run build did not write {ASSETS / 'index.html'}")

    def _modules_stale(self) -> bool:
        """True when static/node_modules is missing or older than the lockfile."""
        lock = STATIC / "package-lock.json"
        modules = STATIC / "node_modules"
        # npm rewrites this file on every install; the directory's own time moves less.
        marker = modules / ".package-lock.json"
        if not marker.is_file():
            return True
        return marker.stat().st_mtime < lock.stat().st_mtime

    def _npm(self, npm: str, *args: str) -> None:
        self.announce(f"running npm {' '.join(args)} in {STATIC}", level=2)
        try:
            subprocess.run([npm, *args], cwd=STATIC, check=True, env=dict(os.environ))
        except subprocess.CalledProcessError as e:
            raise ExecError(
                f"cloud-console: `npm {' '.join(args)}` failed (exit status {e.returncode})"
                " while building the terminal page; see npm's output above."
            ) from None


class build_with_web_assets(build):
    """C{build}, with the page built before anything else."""

    sub_commands = [("build_web_assets", None), *build.sub_commands]


class build_py_with_web_assets(build_py):
    """C{build_py}, building the page first so its files exist when package data is copied."""

    def run(self) -> None:
        self.run_command("build_web_assets")
        super().run()


class sdist_with_web_assets(sdist):
    """C{sdist}, with the built page inside, so installing from it needs no Node.js."""

    def run(self) -> None:
        self.run_command("build_web_assets")
        super().run()


setup(
    cmdclass={
        "build_web_assets": build_web_assets,
        "build": build_with_web_assets,
        "build_py": build_py_with_web_assets,
        "sdist": sdist_with_web_assets,
    }
)
