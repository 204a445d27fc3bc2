"""llmproxy: one HTTP endpoint in front of an organisation's LLM APIs."""

__version__ = "0.1.0"
