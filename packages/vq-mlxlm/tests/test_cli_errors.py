"""The CLI reports vq's own errors in one line and lets anything else show its traceback."""

import pytest

from vq_core import ArtifactError
from vq_mlxlm import cli, commands


def _failing(monkeypatch, error):
    def methods(args):
        raise error

    monkeypatch.setattr(commands, "methods", methods)


def test_a_vq_error_is_one_line(monkeypatch, capsys):
    _failing(monkeypatch, ArtifactError("artifact x is corrupt:\n  checksum mismatch"))
    assert cli.main(["methods"]) == 2
    assert (
        capsys.readouterr().err == "vq methods: error: artifact x is corrupt: checksum mismatch\n"
    )


@pytest.mark.parametrize("error", [KeyError("layer"), ValueError("bug"), OSError("disk")])
def test_anything_else_keeps_its_traceback(monkeypatch, error):
    _failing(monkeypatch, error)
    with pytest.raises(type(error)):
        cli.main(["methods"])


def test_debug_shows_the_traceback_of_vq_errors_too(monkeypatch):
    _failing(monkeypatch, ArtifactError("corrupt"))
    with pytest.raises(ArtifactError):
        cli.main(["--debug", "methods"])


def test_every_advertised_command_exists():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # each one runs: its --help exits 0
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0, name
    advertised = " ".join(cli.__doc__.split()).split("``")[3].removeprefix("vq ").split(" | ")
    assert set(advertised) == set(sub.choices)
