"""Built-in methods, one file each. They are imported on first use through :mod:`anomalens.registry`."""
