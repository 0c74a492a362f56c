"""One module per `mpqsweep` verb; each exposes register(subparsers)."""
