"""`rnndeploy bench runtime` refuses its server part, naming what to install, when the clients are missing."""

from click.testing import CliRunner

from rnndeploy import cli


def test_server_part_names_the_missing_clients(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.bench, "_module_available", lambda name: name != "aiohttp")
    result = CliRunner().invoke(cli.main, ["bench", "runtime", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "needs aiohttp" in result.output and "rnndeploy[bench]" in result.output
    assert "--no-server" in result.output
    assert not any(tmp_path.iterdir()), "nothing is measured or written before the refusal"


def test_module_available_handles_a_missing_parent_package():
    assert cli.bench._module_available("json")
    assert not cli.bench._module_available("no_such_package_rnndeploy.http")
