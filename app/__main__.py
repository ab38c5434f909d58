"""`python -m app`: flowgate's command line (app/cli.py)."""
import sys

from app.cli import main

sys.exit(main())
