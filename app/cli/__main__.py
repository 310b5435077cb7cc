"""`python -m app.cli`: the `facegate` command without its installed script (e.g. from a checkout's own path)."""

from app.cli import main

main()
