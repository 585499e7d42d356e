"""HTTP: SSE parsing, the asyncio + h11 server, the pooled h11 upstream client, the mock upstream."""
