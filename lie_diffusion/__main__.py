"""`python -m lie_diffusion merge | inspect` (the same as the `lie-diffusion` command)."""

from .cli import main

raise SystemExit(main())
