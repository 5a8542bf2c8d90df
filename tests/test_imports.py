"""Imports run one way: every module imports on its own, and the CLI loads only what it runs."""

import pkgutil
import subprocess
import sys

import pytest

import fms_speech

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(fms_speech.__path__, prefix="fms_speech.")
    if not info.name.endswith("__main__")
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# One fresh interpreter imports the third-party libraries once, then forks a child per module:
# each child starts with no fms_speech module loaded, so an import cycle shows up as the
# ImportError of whichever module starts it (a shared interpreter would hide it behind an
# earlier import), at a fraction of the cost of a new interpreter per module.
_IMPORT_EACH = """
import os, sys, traceback
import fms.models, fms.utils.generation, numpy, safetensors, soundfile, soxr, torch
from transformers import AutoConfig, AutoTokenizer
assert not [m for m in sys.modules if m.startswith("fms_speech")]
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            print("FAILED", name, traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    completed = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *MODULES], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    failed = [line for line in completed.stdout.splitlines() if line.startswith("FAILED")]
    assert not failed, failed


@pytest.mark.parametrize("command", ["transcribe", "compile"])
def test_cli_help_does_not_load_model_reference_code(command):
    code = (
        "import sys\n"
        "from fms_speech.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('transformers.models.granite_speech.modeling_granite_speech', 'matplotlib',"
        " 'peft', 'fms_speech.bench.run', 'fms_speech.bench.systems')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    completed = _python(code)
    assert completed.returncode == 0, completed.stderr
    assert "LOADED []" in completed.stdout, completed.stdout.splitlines()[-1]
