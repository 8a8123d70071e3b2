# syntax=docker/dockerfile:1
# The mfserve server image; docs/deploy.md has the walk-through. From the repository root:
#   docker build -t mfserve .                                     # the model is mounted at run
#   docker build -t mfserve --build-arg MODEL=models/movielens .  # the model is baked in

ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mfserve
ENV PATH=/opt/mfserve/bin:$PATH
# torch first, exactly and from the CPU index, as scripts/_setup.sh does: the [server] extra's
# loose torch>=2.4 would otherwise pull a multi-GB CUDA build from PyPI. Its own layer, so a
# source change never downloads torch again.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY client client
COPY server server
COPY training training
# Not editable: the runtime stage copies the venv alone, without /src. DL3013 asks for a pin,
# which a local project cannot take; its dependencies' floors are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[server]'

# The optional baked model and the default config. A bind mount of the context rather than a
# COPY, because COPY cannot skip a source that is not given; the model keeps its folder name,
# which the server reports as the model's name.
FROM python:${PYTHON}-slim AS model
ARG MODEL=""
RUN --mount=type=bind,target=/context \
    mkdir -p /models /etc/mfserve \
    && printf 'host = "0.0.0.0"\nport = 50051\n' > /etc/mfserve/serve.toml \
    && if [ -n "$MODEL" ]; then \
         name="$(basename "$MODEL")" \
         && cp -R "/context/$MODEL" "/models/$name" \
         && printf 'model = "/models/%s"\n' "$name" >> /etc/mfserve/serve.toml; \
       fi

FROM python:${PYTHON}-slim
# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it without a passwd lookup, and a
# mounted model only has to be world-readable.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mfserve
COPY --from=build /opt/mfserve /opt/mfserve
COPY --from=model /models /models
COPY --from=model /etc/mfserve /etc/mfserve
# Only the config file's path is set here: an MFSERVE_* setting in the environment would beat
# every --config file, silently overriding the one mounted in Kubernetes. numba's cache goes to
# /tmp, the one place a read-only root file system leaves writable (an emptyDir there).
ENV PATH=/opt/mfserve/bin:$PATH \
    MFSERVE_CONFIG=/etc/mfserve/serve.toml \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001:10001
EXPOSE 50051
# The gRPC health service through the CLI's own probe: exit 0 only while SERVING, so a loading
# or draining server reads as unhealthy. The start period covers the model's load.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["mfserve", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
# Exec form: mfserve is PID 1 and receives SIGTERM itself, which starts its drain.
ENTRYPOINT ["mfserve", "serve"]
