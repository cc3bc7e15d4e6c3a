# `make run` and `make test` each set themselves up from a fresh clone: a virtual environment in .venv,
# the project installed editable (dependencies from setup.py), and the default data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FMNIST_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data run test lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: Debian's dataset-fashion-mnist when apt is usable, else torchpocket downloads it at run time.
data: $(STAMP)
	@if [ -f $(FMNIST_DEB) ] || [ -f $${TORCHPOCKET_CACHE:-$$HOME/.cache/torchpocket}/data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  echo "fashion-mnist: installed Debian's dataset-fashion-mnist"; \
	else \
	  echo "fashion-mnist: not found locally; it will be downloaded via torchvision on first use"; \
	fi

run: $(STAMP) data
	$(PY) run.py --learner chn-pruned --hpo ddpg --target 0.5

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile  # two worker processes, each test file on one of them

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
