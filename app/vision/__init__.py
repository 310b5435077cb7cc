"""The vision core: bytes -> image -> faces (box, score, 5 landmarks) -> 150x150 chips -> 128-d embeddings.

Each step is its own module and takes the previous step's output, so callers (and bench/) can run or time
any stage alone. Nothing here imports `app.api` or `app.gallery`.
"""
