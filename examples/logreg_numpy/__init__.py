"""Logistic regression in plain numpy on breast-cancer data split across hospitals (see app.py)."""
