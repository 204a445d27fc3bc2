"""Fakes shipped with llmproxy for tests, benchmarks and demos.

:mod:`llmproxy.testing.upstream` is an OpenAI/Anthropic-compatible fake
upstream server with per-request failure and latency controls.
"""
