import subprocess
import sys

from temlib import cli


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for cmd in cli.COMMANDS:
        assert cmd in out


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_python_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "temlib", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("temlib ")
