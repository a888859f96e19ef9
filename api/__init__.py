"""The REST API (FastAPI). HTTP lives here and nowhere else."""
