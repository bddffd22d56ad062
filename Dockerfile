# One image, three roles (server, simulated devices, agent): the extras decide what is installed.
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

# Control plane: API, rollout engine, training worker.
FROM base AS server
RUN pip install ".[server,training]"
EXPOSE 8000
ENTRYPOINT ["edgeloop-server"]
