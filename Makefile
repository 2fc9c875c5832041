# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned: 2.13.0 is a CPU build on these machines (any other request may pull CUDA)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: NVT MD of ethanol with the shipped PaiNN bundle
# (the default run is NVE, as in SchNetPack: the demo asks for its Langevin thermostat).
demo: setup
	$(BIN)/spkserve info spkserve/data/ethanol-painn.bundle
	$(BIN)/spkmd simulation_dir=runs/demo-ethanol overwrite=true dynamics.n_steps=2000 +dynamics/thermostat=langevin system.initializer.temperature=300
	$(BIN)/spkmd plot runs/demo-ethanol

test: setup
	$(BIN)/python -m pytest -q -ra --durations=25 -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info
