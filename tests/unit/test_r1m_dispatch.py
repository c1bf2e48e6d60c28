"""`r1m` dispatches every subcommand lazily: help lists them, an unknown command exits 2, and each
listed module/function exists (so a typo in the table cannot hide until a user runs the command), and a
config error ends the command with its one line and exit code 2, not a traceback."""

import importlib
import subprocess
import sys

from r1_megatron import cli


def test_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "r1_megatron.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(name in out.stdout for name in cli.COMMANDS)
    bad = subprocess.run([sys.executable, "-m", "r1_megatron.cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


def test_every_command_resolves():
    for name, (module, func, _) in cli.COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise AssertionError(f"r1m {name}: module {module} is missing ({e})") from e
        assert callable(getattr(mod, func, None)), f"r1m {name}: {module}.{func} is not defined"


def test_config_error_is_one_line():
    bad = subprocess.run([sys.executable, "-m", "r1_megatron.cli", "train", "demo_cpu", "rl.step=5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == "r1m train: config error: unknown key 'rl.step'; did you mean 'rl.steps'?"
