"""slim serve: the OpenAI-compatible HTTP server over a pool of models loaded on demand.

Imports: inference's public API, formats and store; never an engine's private name.
"""
