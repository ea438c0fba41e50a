"""Toy dmae plugins from a third party: they import nothing from dmae but `dmae_cli.api`."""
