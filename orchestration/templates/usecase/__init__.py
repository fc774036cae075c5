"""The {{name}} use case (see README.md)."""
