"""One module per `wmaudit` subcommand (HELP, add_arguments, run)."""
