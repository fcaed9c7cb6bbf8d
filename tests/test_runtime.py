"""The fitcli command's process settings (fitcli.runtime): freed memory is reused, not faulted back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fitcli import cli, runtime

REPO = Path(__file__).resolve().parent.parent

# Allocate and free a 32 MiB tensor many times and count the page faults of the last rounds.
# glibc's default mmaps a block this size afresh every time (8192 zero-filled pages per round);
# kept memory is reused without a fault.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from fitcli.runtime import keep_freed_memory
    print(keep_freed_memory({}) if sys.argv[1] == "tuned" else False)
    def cycle():
        x = torch.ones(8 << 20)
        del x
    for _ in range(12):  # until the heap holds a free block that fits (posix_memalign pads)
        cycle()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


def faults(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in runtime.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         cwd=REPO, env=env).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_kept_memory_is_reused_without_page_faults():
    applied, tuned = faults("tuned")
    assert applied
    _, default = faults("default")
    assert default >= 5 * 4096  # the default returns the block to the OS each round (5 x 8192 pages)
    assert tuned < default / 20


@pytest.mark.parametrize("env", [{"FITCLI_MALLOC_TUNE": "0"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_opt_out_and_user_settings_win(env):
    assert runtime.keep_freed_memory(env) is False


def test_command_applies_it(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and calls == [1]
