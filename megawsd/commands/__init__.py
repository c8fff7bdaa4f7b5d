"""One module per `megawsd` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
