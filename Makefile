# The README's two commands are `make demo` and `make test`; both run `setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qvm-installed
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev qemu-system-x86 cryptsetup-bin pkg-config build-essential \
	busybox-static e2fsprogs libseccomp2 iproute2 nftables wireguard-tools tcpdump clang libbpf-dev \
	dmsetup flex bison bc libelf-dev libssl-dev lz4 xz-utils
# Userspace WireGuard, where the distribution has it (the WireGuard tests use it when the kernel has no module);
# bpftool (Debian's package name) makes the runtime guard's vmlinux.h from the kernel's BTF.
APT_OPTIONAL := wireguard-go bpftool

.PHONY: setup apt demo test bench lint docs clean

setup: apt $(STAMP)

# apt first: tpm2-pytss builds against libtss2-dev.
$(STAMP): pyproject.toml | apt
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is required"; exit 1; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Debian packages qvm needs (QEMU, busybox-static and e2fsprogs for images, libseccomp, TPM, cryptsetup,
# WireGuard tools and tcpdump for the tunnel tests, clang and libbpf for the eBPF runtime guard, the kernel
# build's tools for qvm's minimal guest kernel); installed only
# when missing. Optional ones only where the
# distribution has them.
apt:
	@missing=$$(for p in $(APT_PACKAGES) $(APT_OPTIONAL); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing: $$missing"; \
	  $$SUDO apt-get update -qq; \
	  for p in $(APT_OPTIONAL); do case " $$missing " in *" $$p "*) \
	    apt-cache show $$p >/dev/null 2>&1 || missing=$$(echo " $$missing " | sed "s/ $$p / /");; esac; done; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	$(VENV)/bin/qvm demo

# qvm's minimal guest kernel first (minutes once, then cached): the VM tests boot it.
test: setup
	$(VENV)/bin/qvm image kernel
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check shared services tests deploy/gpu-check $(wildcard bench)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy deploy/gpu-check
	$(VENV)/bin/lint-imports

docs: setup
	$(PY) -m shared.docsgen > docs/events.md
	$(PY) -m shared.archgen docs/architecture.md
	$(PY) -m shared.natsconf deploy/nats/cluster

clean:
	rm -rf .qvm $(VENV) *.egg-info
