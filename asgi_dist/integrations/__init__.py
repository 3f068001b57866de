"""Framework integrations: FastAPI dependencies and Quart setup."""
