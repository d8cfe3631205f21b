"""The `fit3d` subcommands, one module each (see `fit3d_hf.cli.COMMANDS`)."""

__all__: list[str] = []
