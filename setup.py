"""setuptools hook; everything else is in pyproject.toml. Installs `openjamba-lm-eval.pth` into site-packages.

That one-line .pth file is what lets plain `lm_eval --model openjamba` find our model (see openjamba_lm_eval.py).
A .pth file must sit at the top of site-packages, which no pyproject setting expresses portably, so build_py
writes it: into the build directory for a regular wheel (whose root is site-packages), and for `pip install -e`
straight into the editable wheel, because the editable modes ignore the build directory.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PTH_NAME = "openjamba-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        wheel_root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        line = runpy.run_path(str(HERE / "openjamba_lm_eval.py"))["PTH_LINE"]
        Path(wheel_root).mkdir(parents=True, exist_ok=True)
        (Path(wheel_root) / PTH_NAME).write_text(line + "\n", encoding="utf-8")


setup(cmdclass={"build_py": BuildPyWithPth})
