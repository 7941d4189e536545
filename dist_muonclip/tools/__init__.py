"""Tools around the optimizer: the step profiler and wire counter, the cost model, metric sinks.
They read the optimizer through its public properties; the core imports none of them (the
optimizer creates a :class:`~dist_muonclip.tools.metrics.MetricsLogger` lazily when asked to log)."""
