"""`python -m llmrom ...` runs the command-line tool (also under torchrun)."""

from .cli import main

raise SystemExit(main())
