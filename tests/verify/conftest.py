"""testinfra suite run by `invoke verify` / `fab -H HOST verify` (pytest --hosts=...): one module per step.

`gcfg`: the validated gpubox config the run used (the JSON file named by GPUBOX_CONFIG, which `verify` writes);
the defaults when unset."""

import json
import os

import pytest

from provision import config


@pytest.fixture(scope="session")
def gcfg():
    path = os.environ.get("GPUBOX_CONFIG")
    if path:
        with open(path) as fh:
            return json.load(fh)
    return config.validate(config.defaults()["gpubox"])
