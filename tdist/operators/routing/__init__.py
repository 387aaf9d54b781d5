"""Routing: the router operator, its policies, the KV index, and the disaggregated flow.

Empty on purpose, so importing one piece (e.g. the KV index in a benchmark) loads only that piece.
"""
