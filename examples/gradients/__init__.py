"""The Gradients handler example: its config; the handler is handlers/gradients.py."""
