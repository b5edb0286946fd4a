"""Example brokerfl apps, one package each with its config (see brokerfl.app)."""
