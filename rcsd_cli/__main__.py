from rcsd_cli.cli import main

main()
