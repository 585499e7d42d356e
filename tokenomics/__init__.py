"""tokenomics — a self-hosted guardrail proxy for LLM traffic.

Put it in front of any agent or script that speaks the OpenAI or Anthropic HTTP API and hand
out scoped wrapper tokens (``tkn_...``) instead of real provider keys. Each token's policy
decides which models, how many tokens and dollars, how fast, what content may pass, which
system prompts are injected, where traffic is routed and what is recorded.

The package reads in the direction of its imports: ``errors``/``util`` at the bottom, the pure
domain (``policy``, ``guard``, ``limits``, ``dialects``, ``translate``) above them, the edges
(``store``, ``limits.state``, ``http``, ``records``) above that, then ``pipeline``, ``proxy`` and
``cli``.
"""

__version__ = "0.1.0"
