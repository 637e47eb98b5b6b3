# serve_app on Ray Serve: one image for the Ray head and workers (KubeRay) or a single container.
#   docker build --build-arg EXTRA=cpu -t serve-app:0.1.0-cpu .
#   docker build --build-arg EXTRA=gpu -t serve-app:0.1.0-gpu .
#   docker run -p 8000:8000 serve-app:0.1.0-cpu               # the demo model, configs/cpu_demo.yaml
# Why a slim Python base and not rayproject/ray, the layout and how models get in: docs/CONTAINER.md.
# tests/unit/test_packaging.py and tests/e2e/test_container_install.py read this file.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
# cpu (onnxruntime) or gpu (onnxruntime-gpu, CUDA 13 as wheels): never both, see pyproject.toml.
ARG EXTRA=cpu
# The Ray every node runs; KubeRay's rayVersion (k8s/base/rayservice.yaml) must equal it.
ARG RAY_VERSION=2.60.0
# 1: the 26 MB demo model stays at /app/models/demo, the default model_path; 0: no model at all.
ARG DEMO_MODEL=1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md serve_config.yaml ./
COPY serve_app ./serve_app
COPY configs ./configs
COPY models/demo ./models/demo
RUN python -m venv /opt/venv
# Editable: serve_app finds its demo model beside the package (serve_app.DEMO_MODEL_DIR), so the
# project keeps its layout at /app and the runtime stage copies /app and /opt/venv to the same paths.
RUN /opt/venv/bin/pip install -e "/app[${EXTRA}]" "ray[serve]==${RAY_VERSION}"
RUN /opt/venv/bin/python -c "import sys; from serve_app.engine.runtime_install import check_install; sys.exit(check_install('${EXTRA}'))"
RUN if [ "${DEMO_MODEL}" != "1" ]; then rm -rf /app/models/demo; fi

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# KubeRay's default probes run wget; everything else the image needs is in the venv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
ENV PATH=/opt/venv/bin:${PATH} PYTHONUNBUFFERED=1 HOME=/home/ray
# The code and the demo model stay root-owned and read-only; Ray writes /tmp/ray, TensorRT
# engines go to ~/.cache/serve_app/tensorrt.
USER 1000:1000
WORKDIR /app
# Serve HTTP, Ray dashboard (where KubeRay submits the Serve config), GCS, Ray metrics.
EXPOSE 8000 8265 6379 8080
# KubeRay replaces this with `ray start`; alone, the container serves the config given as its
# argument (a GPU image: docker run --gpus all -v /srv/models:/models:ro IMAGE configs/gpu_onnx.yaml).
ENTRYPOINT ["serve", "run"]
CMD ["configs/cpu_demo.yaml"]
