"""One module per subcommand: a ``run_*`` function (used by the demo and tests) and its Typer command."""
