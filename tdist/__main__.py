"""`python -m tdist` → the CLI."""

from tdist.cli.app import main

if __name__ == "__main__":
    main()
