"""One module per `slim` subcommand, each exposing `command` (a click command)."""
