"""A CNN with BatchNorm on the 5,000 MNIST images (see app.py)."""
