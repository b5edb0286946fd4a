"""pytorch_app: a Flower app training a torch MLP on brokerfl's packaged data."""
