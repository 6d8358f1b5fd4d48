"""The shipped experiment configs: `python -m trainer --config=<name>[:<variant>]`.

Each module is a config file with `get_config(variant)` (see README.md here);
`trainer/config_names.py` resolves a bare name to the installed module's file.
"""
