# One Dockerfile for every qvm service. QVM_EXTRAS names the pyproject extras to install: a service's image
# takes its own (docker-compose.yml gives each service its role, e.g. `scheduler`, `node-agent`), the one-shot
# jobs take `cli`; the default, `all`, is one image with every service and the CLI. The command picks the
# service, e.g.
#   docker build --build-arg QVM_EXTRAS=scheduler -t qvm-scheduler .
#   docker run --rm qvm-scheduler services.scheduler      (runs `python -m services.scheduler`)
FROM python:3.11-slim

ARG QVM_EXTRAS=all

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tpm2-pytss (in the node-agent's and the key-broker's extras: the node's TPM, a TPM-sealed KEK ring) builds
# against the TSS libraries; its runtime needs them too. Images without it skip them.
RUN case ",${QVM_EXTRAS}," in \
      *,node-agent,*|*,key-broker,*|*,all,*) \
        apt-get update -qq \
        && apt-get install -y -qq --no-install-recommends libtss2-dev pkg-config gcc \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac

WORKDIR /src
# Only what the package needs (no .venv, .git or state directories in the build).
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
RUN pip install ".[${QVM_EXTRAS}]" \
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
