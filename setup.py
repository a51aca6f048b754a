"""Ships the repository's ``recipes/`` inside the package as ``densessl/recipes/`` without a
symlink: ``build_py`` copies the YAML files into the build, so a wheel holds them as package
data (found with ``importlib.resources``). An editable install reads ``recipes/`` of the
checkout instead (``densessl.recipe.recipes_dir``). Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildPyWithRecipes(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "densessl" / "recipes"
        for source in sorted(RECIPES.rglob("*.yaml")):
            dest = target / source.relative_to(RECIPES)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildPyWithRecipes})
