"""facegate: one-shot face enrolment, 1:1 verification and open-set 1:N identification.

Importing the package does no I/O (it only turns ONNX Runtime's telemetry off, below): models, database and index
open in `app.main.create_app`'s lifespan.
"""

import os

__version__ = "0.1.0"

# ONNX Runtime >= 1.29 on Linux keeps a device id and a queue of usage events under ~/.cache/Microsoft and uploads
# them to Microsoft, unless this is set before onnxruntime is first imported (it reads it once per process). A
# service that handles biometric data sends nothing anywhere nor leaves files behind; setting the variable in the
# environment yourself (ORT_DISABLE_TELEMETRY=0 turns it back on) decides otherwise. Here rather than beside
# `import onnxruntime`, so that whatever imports onnxruntime first (a test, a bench script importing the app) finds
# it set.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
