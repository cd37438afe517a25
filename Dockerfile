# vis-service on CUDA. onnxruntime-gpu 1.31+ wheels on PyPI are built for CUDA 13 with cuDNN 9,
# which this base provides. Without a GPU (or without --gpus) the service reports and uses the CPU provider.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# The server package only (runtime dependencies, not editable, owned by root): the user the
# service runs as cannot change its code. The client and the test tools are not in the image.
COPY pyproject.toml README.md LICENSE /src/
COPY vis_service /src/vis_service
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir /src "onnxruntime-gpu>=1.31" \
 && rm -rf /src
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 vis
USER vis
WORKDIR /home/vis
# a model repository: /models/<name>/model.onnx (+ config.json | config.pbtxt, labels.txt)
VOLUME ["/models"]
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD vis-service health --address 127.0.0.1:50051 || exit 1
CMD ["vis-service", "serve", "--host", "0.0.0.0", "--port", "50051", "--model-repository", "/models"]
