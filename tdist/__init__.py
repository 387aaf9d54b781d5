"""tdist: one graph YAML → a running, observable, fault-tolerant distributed inference deployment."""

__version__ = "0.1.0"
