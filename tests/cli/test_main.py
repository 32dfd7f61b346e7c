import subprocess
import sys

from ssmkit.cli.main import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "info" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "ssmkit" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "ssmkit", "info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
