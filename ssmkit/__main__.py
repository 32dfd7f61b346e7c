from ssmkit.cli.main import entry

entry()
