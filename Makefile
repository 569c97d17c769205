# Daily verbs, each a thin call of `homelab` (or of the test runner). `make setup` first.
VENV ?= .venv
HOMELAB := $(VENV)/bin/homelab
PYTEST := $(VENV)/bin/pytest
ROLES := intranet extranet

.PHONY: setup test test-rehearsal test-unit lint $(addprefix image-,$(ROLES)) $(addprefix boot-,$(ROLES)) \
        $(addprefix verify-,$(ROLES)) $(addprefix down-,$(ROLES)) $(addprefix render-,$(ROLES)) \
        $(addprefix up-,$(ROLES)) $(addprefix status-,$(ROLES)) $(addprefix logs-,$(ROLES)) backup

setup:
	./setup.sh

test:
	$(PYTEST) tests

# The local swap end to end alone (tests/vm/test_local_swap.py, also in `make test`): about 15 minutes under TCG.
test-rehearsal:
	$(PYTEST) -m rehearsal tests/vm

test-unit:
	$(PYTEST) -m "not vm and not host" tests

lint:
	$(VENV)/bin/ruff check builder tests bench images/files/intranet/homelab-backup
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict images/files/intranet/homelab-backup

$(addprefix up-,$(ROLES)): up-%:
	$(HOMELAB) deploy $* --swap

$(addprefix status-,$(ROLES)): status-%:
	$(HOMELAB) status $*

$(addprefix logs-,$(ROLES)): logs-%:
	$(HOMELAB) logs $*

backup:
	$(HOMELAB) backup intranet run

$(addprefix image-,$(ROLES)): image-%:
	$(HOMELAB) build image $*

$(addprefix boot-,$(ROLES)): boot-%:
	$(HOMELAB) boot $*

$(addprefix verify-,$(ROLES)): verify-%:
	$(HOMELAB) verify $*

$(addprefix down-,$(ROLES)): down-%:
	$(HOMELAB) down $*

$(addprefix render-,$(ROLES)): render-%:
	$(HOMELAB) render $*
