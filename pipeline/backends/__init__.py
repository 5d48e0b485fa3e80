"""Model backends: `openai` (any OpenAI-compatible server) and `offline` (pixels only, no network)."""
