# minidalle2 quickstart
#   make course                 run every notebook at the cpu preset -> build/course/cpu/index.html
#   make course PRESET=smoke    seconds per notebook: proves the plumbing
#   make test                   the test suite (what CI runs)
#   make student                student versions of the notebooks (solutions removed) -> build/student/
# The first run creates .venv and installs the package into it (pip install -e '.[dev]');
# it is refreshed whenever pyproject.toml changes.

PYTHON ?= python3
PRESET ?= cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minidalle2-installed

.PHONY: course test student strip clean distclean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

course: $(STAMP)
	$(PY) -m minidalle2 course --preset $(PRESET)

# pytest exits 5 when it collected no tests: that is not a failure here
test: $(STAMP)
	@$(PY) -m pytest -q --durations=10; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected"; exit 0; fi; \
	exit $$rc

student: $(STAMP)
	$(PY) -m minidalle2 student --out build/student

# remove outputs from the notebooks before committing them
strip: $(STAMP)
	$(PY) -m minidalle2.course --strip

clean:
	rm -rf build .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
