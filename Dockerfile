# CPU image by default. For GPUs: docker build --build-arg BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime .
ARG BASE=python:3.11-slim
FROM ${BASE}
# CPU wheels unless the base image already brings a (CUDA) torch.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY common common
COPY fl_server fl_server
COPY fl_client fl_client
COPY fl_tools fl_tools
RUN python -c "import torch" 2>/dev/null || pip install --no-cache-dir --index-url ${TORCH_INDEX} torch torchvision; \
    pip install --no-cache-dir .
# gRPC port of fl-server.
EXPOSE 50051
# Plaintext by default so that `docker-compose up` works out of the box on its private network; mount
# certificates from fl-certs and pass --tls-cert/--tls-key instead of --insecure anywhere else.
CMD ["fl-server", "--host", "0.0.0.0", "--port", "50051", "--out", "/runs/latest", "--insecure"]
