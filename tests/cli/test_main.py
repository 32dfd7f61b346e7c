import subprocess
import sys

import pytest

from ssmkit.cli.main import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "info" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "ssmkit" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "ssmkit", "info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
