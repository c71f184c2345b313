# Quick start: `make demo` (compare a sample pair) and `make test` (the whole suite).
# Both create .venv and install qdiff into it first, so they work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-min install samples clean

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

# The dependency floors of pyproject.toml, exactly, in a second venv: a fast subset that loads,
# quantizes, compares, diagnoses and profiles (about a minute). CI runs it after `make test`.
MIN_VENV ?= .venv-min
MIN_PINS := "numpy==1.24.4" "onnx==1.16.0" "onnxruntime[quantization]==1.28.0" "pandas==2.0.3" \
	"matplotlib==3.7.0" "rich==13.0.0"
MIN_TESTS := tests/test_api.py tests/test_compare.py tests/test_diagnose.py tests/test_profile.py tests/test_ops.py \
	tests/test_config_quantize.py tests/test_kernels.py tests/test_sensitivity.py tests/test_fallback_real.py

$(MIN_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet $(MIN_PINS) -e ".[test]"
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -c "import numpy, onnx, onnxruntime; print('floors: numpy', numpy.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# Regenerate sample_models/ (needs scikit-learn and onnxconverter-common; not needed by tests).
samples: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[samples]"
	$(BIN)/python sample_models/build.py

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache build *.egg-info
