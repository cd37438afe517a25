# vis-service on CUDA. onnxruntime-gpu 1.2x/1.3x wheels on PyPI are built for CUDA 12/13 with
# cuDNN 9; this base matches the CUDA 13 + cuDNN 9 build that pip resolves today.
# Without a GPU (or without --gpus) the service reports and uses the CPU provider.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 vis
WORKDIR /app
COPY --chown=vis:vis . /app

# the same install step as the README's commands (make demo / make test)
RUN make install VENV=/opt/venv && chown -R vis:vis /opt/venv
ENV PATH=/opt/venv/bin:$PATH

USER vis
VOLUME ["/models"]
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD vis-service health --address 127.0.0.1:50051 || exit 1
CMD ["vis-service", "serve", "--host", "0.0.0.0", "--port", "50051", "--model-repository", "/models"]
