"""Stage configs: one module per stage beside the option groups they share (``groups``).

Each field is an option declared once (``rcsd_cli.data.options``): its type, default and help derive the
command line, config files and provenance.
"""
