"""Load generator for any OpenAI-compatible endpoint: ``python -m serve_app.bench``."""
