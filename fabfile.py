# Fabric looks for a collection named `fabfile`; the tasks live in tasks.py so `invoke` and `fab` share them.
from tasks import ns  # noqa: F401
