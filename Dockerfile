# One image for every qvm service; docker-compose.yml picks the service with its command, e.g.
#   docker run --rm qvm services.scheduler      (runs `python -m services.scheduler`)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tpm2-pytss (the node-agent's TPM access) builds against the TSS libraries; its runtime needs them too.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libtss2-dev pkg-config gcc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the package needs (no .venv, .git or state directories in the build).
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
RUN pip install . \
 && rm -rf /src

# An unprivileged user for the services; the PKI directory is created with its owner so that a fresh
# named volume mounted there inherits it. The node-agent runs as root (KVM, TPM; see docker-compose.yml).
RUN useradd --system --uid 10001 --home-dir /var/lib/qvm --create-home qvm \
 && install -d -o qvm -g qvm -m 0700 /etc/qvm/pki
ENV QVM_PKI_DIR=/etc/qvm/pki \
    QVM_STATE_DIR=/var/lib/qvm
USER qvm
WORKDIR /var/lib/qvm

ENTRYPOINT ["python", "-m"]
CMD ["services.scheduler"]
