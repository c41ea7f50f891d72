"""The settings the code reads, local.settings.json.example and the README agree."""

import json
import re

from .conftest import REPO

HOST_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsStorage"}  # the Functions host's, not ours


def _settings_read_by_the_code() -> set[str]:
    source = (REPO / "shared" / "config.py").read_text()
    prefixes = "PKI|CA|ROOT|INTERMEDIATE|DEVICE|KEY_VAULT|LEDGER|QUEUE|EXPIRY|DPS|AZURE|RESOURCE"
    return set(re.findall(rf'"((?:{prefixes})_[A-Z_]+)"', source))


def test_the_example_lists_exactly_the_settings_the_code_reads():
    example = json.loads((REPO / "local.settings.json.example").read_text())["Values"]
    assert set(example) - HOST_SETTINGS == _settings_read_by_the_code()


def test_the_readme_documents_every_setting_and_command():
    readme = (REPO / "README.md").read_text()
    for name in _settings_read_by_the_code():
        assert f"`{name}`" in readme, name
    from cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert f"`{command}" in readme, command
