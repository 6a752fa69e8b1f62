"""`dinv info`."""
from dinv import cli


def test_info_names_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("cpp", "triton", "reference"):
        assert name in out
    assert "cpu tensors ->" in out
