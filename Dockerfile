# facegate: a face verification service. Two stages:
#   builder — installs the package and builds the ONNX models with the very commands `make test` uses
#             (`make models` -> venv + `python -m models.build`), so CI proves the image's install path;
#   runtime — the venv (with the migrations) and the built models on a plain Debian with Python, as a non-root user,
#             under tini (PID 1: passes SIGTERM on to `facegate serve`, reaps orphans). Needs no network at run time.
#
#   docker build -t facegate .                      # CPU (onnxruntime-gpu falls back to its CPU provider)
#   docker build --build-arg CUDA=1 -t facegate:cuda .   # + CUDA 13 / cuDNN 9 from NVIDIA's pip packages
#   docker run --rm -p 127.0.0.1:8000:8000 -v facegate-data:/var/lib/facegate \
#       -e FACEGATE_AUTH__BOOTSTRAP_KEY="$(python3 -c 'import secrets; print(f"fg_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}")')" facegate
#   (auth is on in the image: every request but health/metrics needs that key, or one from
#    `docker exec CONTAINER facegate keys create --name NAME --scope read`)
#   docker run --rm --gpus all -e FACEGATE_REQUIRE_GPU=true ... facegate:cuda  (host: NVIDIA driver + container toolkit)
# `docker stop` sends SIGTERM: the requests in flight get FACEGATE_SHUTDOWN_TIMEOUT (8 s) to finish, then the server
# exits 0, inside docker's default 10 s; with a longer timeout, give `docker stop -t` / `--stop-timeout` a few more.
#
# No CUDA base image is needed: onnxruntime-gpu loads CUDA/cuDNN from the nvidia-* wheels (onnxruntime.preload_dlls()).
# BASE_IMAGE must be the same Debian release in both stages: the venv links to its /usr/bin/python3 (3.11 on bookworm).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG CUDA=0
# 1: keep the build-only packages (onnx, face_recognition_models: ~120 MB) in the runtime venv.
ARG KEEP_BUILD_DEPS=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Cache layer, rebuilt only when pyproject.toml changes: the declared dependencies (+ the build, ann and heic extras) go
# into the venv first, so that a code change does not download ~500 MB again. `make models` below still runs the full
# install (`pip install '.[build,ann,heic]'`): it finds these satisfied and installs the package itself.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
 && /opt/venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["build"] + p["optional-dependencies"]["ann"] + p["optional-dependencies"]["heic"]))' >/tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install --quiet -r /tmp/requirements.txt
COPY . .
# The same target as `make test`'s set-up, with a non-editable install of the `build` extra (models), `ann`
# (FACEGATE_INDEX__BACKEND=approximate for large galleries) and `heic` (pi-heif: HEIC photos, off unless
# FACEGATE_IMAGE__HEIC=true); no test, report or training packages.
RUN make models VENV=/opt/venv EXTRAS=build,ann,heic PIP_FLAGS= MODELS_DIR=/opt/facegate/models PYTHON=python3 \
 && test -s /opt/facegate/models/manifest.json
RUN set -e; \
    if [ "$CUDA" = "1" ]; then \
        ort=$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))'); \
        /opt/venv/bin/python -m pip install --quiet "onnxruntime-gpu[cuda,cudnn]==$ort"; \
    fi; \
    if [ "$KEEP_BUILD_DEPS" != "1" ]; then \
        /opt/venv/bin/python -m pip uninstall --quiet -y face_recognition_models onnx; \
    fi
# app.gallery.db looks for Alembic's scripts in REPO_ROOT/migrations, REPO_ROOT being the folder above the `app`
# package: in an installed (non-editable) venv that is site-packages. Put them there.
RUN set -e; \
    root=$(cd / && /opt/venv/bin/python -c 'from app.config import REPO_ROOT; print(REPO_ROOT)'); \
    cp -r migrations "$root/migrations"; \
    find "$root/migrations" -name '__pycache__' -prune -exec rm -rf {} +; \
    test -f "$root/migrations/env.py"

FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 facegate \
 && useradd --system --uid 10001 --gid facegate --home-dir /var/lib/facegate --shell /usr/sbin/nologin facegate \
 && mkdir -p /var/lib/facegate \
 && chown facegate:facegate /var/lib/facegate
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/facegate/models /opt/facegate/models
WORKDIR /opt/facegate
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FACEGATE_MODELS_DIR=/opt/facegate/models \
    FACEGATE_HOST=0.0.0.0 \
    FACEGATE_PORT=8000 \
    FACEGATE_DATABASE_URL=sqlite:////var/lib/facegate/facegate.db \
    FACEGATE_AUTH__REQUIRED=true
USER facegate
VOLUME ["/var/lib/facegate"]
EXPOSE 8000
# /readyz: models loaded, database reachable, index built (503, so unhealthy, otherwise). Auth never applies to it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FACEGATE_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
# tini as PID 1: a Python PID 1 gets no default signal handling (SIGTERM before uvicorn's handlers are in would be
# ignored until docker's SIGKILL) and would not reap the orphans of --workers N.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["facegate", "serve", "--host", "0.0.0.0"]
