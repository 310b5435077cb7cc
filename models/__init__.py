"""Build-time conversion of dlib's packaged model files into ONNX graphs and numpy arrays.

Run `python -m models.build --out DIR` (or `make models`). Nothing in `app/` imports this package.
"""
