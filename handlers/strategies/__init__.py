"""Strategies: the arithmetic that turns updates into the next global model.

``base`` says what a strategy is and how a config names one; ``aggregate`` holds the plain
functions the strategies share (running sums, checks, staleness weights).
"""
