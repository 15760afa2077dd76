"""One module per kernel mechanism; each usable on its own."""
