"""The six steps. Their order is declared once, as provision/schema.py's STEP_NAMES (the configuration checks
`steps:`, --only and --skip against it); the tasks, the runner and the tests take it from STEPS.
Each module: NAME, TITLE, FACTS, check(), apply() (provision/engine.py).

>>> [m.NAME for m in STEPS] == list(STEP_NAMES) and set(BY_NAME) == set(STEP_NAMES)
True
"""

from ..schema import STEP_NAMES
from . import build, compiler, cuda, driver, models, patch

BY_NAME = {m.NAME: m for m in (build, compiler, cuda, driver, models, patch)}
STEPS = [BY_NAME[n] for n in STEP_NAMES]
