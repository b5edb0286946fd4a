"""numpy_app: a Flower app whose model is two NumPy arrays."""
