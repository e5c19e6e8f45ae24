# polymae: `make demo` and `make test` on a fresh machine, nothing else needed.
# Both create .venv, install every pinned dependency (torch is the CPU build
# found on disk: never an unpinned torch, which pulls a multi-GB CUDA build)
# and libusb-1.0 for open3d when the system lacks it.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test bench clean system-deps

install: $(STAMP)

system-deps:
	@if ! ldconfig -p | grep -q 'libusb-1.0.so.0'; then \
		echo "installing libusb-1.0 (open3d needs it)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	fi

$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@# laspy's real LAS/LAZ test scans ship only in its sdist: fetch them from the registry once
	$(BIN)/python -c "from polymae.shared.packaged_data import fetch_laspy_test_scans as f; print('laspy scans:', f())"
	touch $(STAMP)

demo: install
	$(BIN)/polymae pretrain

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs *.egg-info
