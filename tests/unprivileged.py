"""A command's prefix that runs it without the capabilities that let root write anywhere, so that a
folder made read-only (chmod) is read-only to it as to any user: nothing as another user, nothing
for a test run as one."""
import os
import shutil

import pytest


def unprivileged() -> list[str]:
    """`setpriv` dropping CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER when run as root
    (the test is skipped where setpriv is missing); nothing otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv, to run without root's capabilities")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
