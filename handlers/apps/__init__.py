"""Built-in apps (see brokerfl.app): ``mlp``, the default one."""
