"""The CLI: typer commands and rich rendering. The only code that prints or exits."""
