"""One module per `seed-story` subcommand: HELP, add_arguments(parser), run(args) -> exit code."""
