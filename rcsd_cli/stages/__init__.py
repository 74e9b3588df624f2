"""The library API of every pipeline stage: ``run_<stage>(config, output, ...)``.

Each function takes its stage's Pydantic config (``rcsd_cli.configs``) and does what the
subcommand of the same name does; ``rcsd_cli.commands`` only turns flags into that config.
"""
