"""The document-QA demo (what `make demo` runs): `python scripts/docqa_demo.py --help`."""

from memlm.cli import app

if __name__ == "__main__":
    import sys

    app(["demo", *sys.argv[1:]])
