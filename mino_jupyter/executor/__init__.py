"""The resident cell executor (prototype): mino-exec.c and its client."""
