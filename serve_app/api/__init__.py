"""The HTTP APIs: OpenAI-compatible and native wire types, errors, SSE framing, rendering."""
