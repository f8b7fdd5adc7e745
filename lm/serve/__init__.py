"""The OpenAI-compatible server: a continuous-batching engine (engine.py) behind a FastAPI
app (api.py); scripts/serve.py runs it."""
