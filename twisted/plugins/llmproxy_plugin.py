"""The twistd dropin: ``twistd -n llmproxy --config etc/config.yml``."""

from twisted.application.service import ServiceMaker

llmproxy = ServiceMaker(
    "llmproxy",
    "llmproxy.tap",
    "An HTTP gateway in front of LLM and embedding APIs.",
    "llmproxy",
)
