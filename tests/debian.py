"""Debian's packages that tests need (pgbouncer, memcached), installed when missing."""

import os
import shutil
import subprocess


def debian_program(name, package, debian_path):
    """The executable ``name``, from Debian's ``package`` installed with apt-get when
    it is missing and this runs as root; None when it cannot be had."""

    def found():
        return shutil.which(name) or (
            debian_path if os.path.exists(debian_path) else None
        )

    if found() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another tox env may be installing it at the same time: wait for dpkg's lock.
    wait = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (["update", "-qq"], ["install", "-y", "-qq", package]):
        subprocess.run(
            ["apt-get", *wait, *command],
            env=env,
            check=False,
            timeout=600,
            capture_output=True,
        )
    return found()
