"""``python -m coralfs``: the command line."""

from coralfs.cli import run

if __name__ == "__main__":
    run()
