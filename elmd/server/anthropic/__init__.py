"""Anthropic's Messages API (/v1/messages), for apps built on Anthropic's SDKs."""
