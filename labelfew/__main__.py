"""`python -m labelfew`, so that `accelerate launch -m labelfew ...` and `torchrun -m labelfew ...` work."""

from labelfew.cli import main

main()
