"""Guardrails: rules, PII detectors, the jailbreak detector, the anonymizer and the stream guard.
Everything here is text in, text or decisions out: no JSON bodies, no sockets."""
