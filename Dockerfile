# The torouter endpoint (torouter serve) on CPU: one replica per container.
#
#   docker build -t torouter .
#   docker run -p 8000:8000 -v $PWD/serve:/config:ro torouter
#
# /config/serve.yaml is the server config (router folder, experts, auth; see docs/serve.md);
# mount it (and the router it names) read-only. Every replica built from the same config
# answers the same way: the endpoint keeps no state between requests.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The CPU build of torch first, so that installing torouter does not pull the CUDA one.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2,<3"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY langchain_torouter ./langchain_torouter
COPY llamaindex_torouter ./llamaindex_torouter
COPY torouter_apps ./torouter_apps
RUN pip install ".[all]" && rm -rf /src

RUN useradd --create-home --uid 10001 torouter
USER torouter
WORKDIR /home/torouter
EXPOSE 8000

# 0.0.0.0 inside the container: the config must set auth (a bearer token) for a non-loopback host.
CMD ["torouter", "serve", "--config", "/config/serve.yaml", "--host", "0.0.0.0", "--port", "8000"]
