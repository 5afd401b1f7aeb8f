"""The process set-up of ``thinkcap serve``."""

from __future__ import annotations

import resource

from thinkcap.cli.runtime import raise_open_files


def test_the_open_files_limit_is_raised_to_its_hard_limit() -> None:
    """Idle client connections each hold a descriptor: the soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        got = raise_open_files()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard and got == (None if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
