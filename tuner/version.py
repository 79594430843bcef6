"""The package's version, in a module of its own: modules that report it (the probe record, the
HTTP client's User-Agent) import it from here, not from `tuner`, whose `__init__` reaches the
`plan_for` facade and through it the probes (an import cycle)."""

__version__ = "0.1.0"
