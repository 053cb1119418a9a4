"""The six steps, in the order they run. Each module: NAME, TITLE, FACTS, check(), apply()."""

from . import build, compiler, cuda, driver, models, patch

STEPS = [driver, cuda, compiler, patch, build, models]
BY_NAME = {m.NAME: m for m in STEPS}
