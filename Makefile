# Quick start: `make demo` (compare a sample pair) and `make test` (the whole suite).
# Both create .venv and install qdiff into it first, so they work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install samples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qdiff compare sample_models/digits_cnn.float.onnx sample_models/digits_cnn.qdq_per_tensor.onnx \
		--data sample_models/digits_test.npz

test: $(STAMP)
	sh scripts/install_chromium.sh
	$(BIN)/python -m pytest -q

# Regenerate sample_models/ (needs scikit-learn and onnxconverter-common; not needed by tests).
samples: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[samples]"
	$(BIN)/python sample_models/build.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
