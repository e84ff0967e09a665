"""Build hook: the shipped rules live in ``rules/`` at the top of the source tree (where people edit and review
them); a built package carries them as ``sconify/data/rules``, where the rule loader looks when ``rules/`` is not
beside the package. Everything else is in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRules(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "rules"
        target = Path(self.build_lib) / "sconify" / "data" / "rules"
        target.mkdir(parents=True, exist_ok=True)
        for rule in sorted(source.glob("*.yaml")):
            shutil.copy2(rule, target / rule.name)


setup(cmdclass={"build_py": BuildWithRules})
