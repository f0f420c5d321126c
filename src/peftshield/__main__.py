"""``python -m peftshield`` runs the command line."""

from peftshield.cli import entry

if __name__ == "__main__":
    entry()
