# Doctests run over the package; the module entry point would run the CLI on import.
collect_ignore = ["lightning_opt/__main__.py"]
