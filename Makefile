# Two commands on a fresh machine (Python 3.11, package registries only):
#   make demo   train SuperSimpleNet on the packaged ELPV solar cells and show the result
#               (ELPV is CC BY-NC-SA 4.0, non-commercial: the optional extra defectscope[elpv])
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/defectscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test,elpv]"
	touch $@

install: $(BIN)/defectscope

demo: install
	$(BIN)/defectscope train --run-name demo

test: install
	$(BIN)/python -m pytest -q --timeout=600

clean:
	rm -rf $(VENV) results .pytest_cache
