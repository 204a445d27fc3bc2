"""Fakes shipped with llmproxy for tests, benchmarks and demos.

:mod:`llmproxy.testing.upstream` is an OpenAI/Anthropic-compatible fake
upstream server with per-request failure and latency controls;
:mod:`llmproxy.testing.resolver` a name resolver from a fixed table;
:mod:`llmproxy.testing.agent` an in-memory ``IAgent`` answered by hand, for
tests on a fake clock. The ``_``-prefixed modules serve those and are
private to the package.
"""
