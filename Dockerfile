# pool-managerd with the embedded-NATS extra and NVML bindings. GPUs reach the container through
# the NVIDIA container toolkit (`--gpus all`); without one, use a simulated inventory.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[gpu]'
ENTRYPOINT ["pool-managerd"]
CMD ["run", "--config", "/etc/pool-managerd/config.toml"]
