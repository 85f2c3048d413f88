"""Build hook: the methods docs (docs/methods/*.md, the source of truth at the top of the repo) ship inside the
package as arbiter/_methods_docs/, so a report written from a wheel install can copy and link them."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithMethodsDocs(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "docs" / "methods"
        if not src.is_dir():
            raise SystemExit(f"docs/methods not found next to setup.py ({src}): the methods docs must ship with "
                             "the package; build from a full checkout or sdist")
        dst = Path(self.build_lib) / "arbiter" / "_methods_docs"
        dst.mkdir(parents=True, exist_ok=True)
        for page in sorted(src.glob("*.md")):
            self.copy_file(str(page), str(dst / page.name))


setup(cmdclass={"build_py": BuildPyWithMethodsDocs})
