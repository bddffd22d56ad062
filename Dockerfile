# One source tree, an image per role; the extras decide what is installed:
#   agent  - edge devices: the agent extra only (no torch, no fastapi)
#   server - the control plane: API, registrar, signing, rollouts (no torch, no scikit-learn)
#   worker - `edgeloop worker`: the queue and the trainers (torch, scikit-learn)
#   sim    - the simulated fleet (drift is made with torchvision)
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY device_agent ./device_agent
COPY server ./server
COPY training ./training
COPY firmware_sim ./firmware_sim

# Edge devices: only the agent extra (no torch, no fastapi).
FROM base AS agent
RUN pip install ".[agent]"
ENTRYPOINT ["edgeloop-agent"]

# Control plane: API, MQTT bridge, rollout engine, the registrar of trained models. Trains
# nothing: run the worker image beside it.
FROM base AS server
RUN pip install ".[server]" \
 && ! python -c "import torch" 2>/dev/null \
 && ! python -c "import sklearn" 2>/dev/null
EXPOSE 8000
ENTRYPOINT ["edgeloop-server"]

# Training worker: claims jobs from the database, trains, hands results to the artifact store.
FROM base AS worker
RUN pip install ".[worker]"
ENTRYPOINT ["edgeloop", "worker"]

# Simulated devices (firmware_sim.fleet): agents plus the digits data and its drift.
FROM worker AS sim
RUN pip install ".[sim]"
ENTRYPOINT []
