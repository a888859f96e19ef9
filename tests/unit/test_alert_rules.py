"""The shipped Prometheus alert rules (deploy/prometheus/maintctl-alerts.yml): valid for
promtool, each fired and each kept quiet by tests/alerts/maintctl-alerts.test.yml, each with a
runbook, and written against series that /metrics serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cycle.outbox import Outbox
from controller.hosts.host_pings import HostPings
from controller.hosts.hypervisor import HypervisorPool
from controller.services.metrics import ServiceMetrics
from tests.conftest import migrated

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "maintctl-alerts.yml"
CASES = ROOT / "tests" / "alerts" / "maintctl-alerts.test.yml"
# Served by the metadata listener once its refusals are counted (written against that name).
SERVED_ELSEWHERE = {"maintctl_metadata_refused_total"}
TEMPLATE = re.compile(r"\{\{\s*\$(value|labels\.([a-z_]+))\s*\}\}")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make testbed` installs it (Debian's prometheus package)")
    return found


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _render(template: str, labels: dict[str, str], value: Any) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) == "value":
            assert value is not None, f"an expected alert needs `value` for {template!r}"
            return f"{value:g}"
        return labels[m.group(2)]

    return TEMPLATE.sub(one, template)


def filled_cases() -> dict[str, Any]:
    """The cases file with each expected alert's annotations rendered from the rules."""
    by_name = {r["alert"]: r for r in rules()}
    cases = yaml.safe_load(CASES.read_text())
    cases["rule_files"] = [str(RULES)]
    for test in cases["tests"]:
        for check in test["alert_rule_test"]:
            rule = by_name[check["alertname"]]
            for alert in check["exp_alerts"]:
                value = alert.pop("value", None)
                labels = {k: str(v) for k, v in alert["exp_labels"].items()}
                alert["exp_annotations"] = {
                    k: _render(v, labels, value) for k, v in rule["annotations"].items()
                }
    return cases


def test_promtool_checks_the_rules():
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_fires_each_alert_and_keeps_each_quiet(tmp_path):
    path = tmp_path / "cases.yml"
    path.write_text(yaml.safe_dump(filled_cases(), sort_keys=False))
    done = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_runbook_and_cases_both_ways():
    cases = yaml.safe_load(CASES.read_text())
    checks = [c for t in cases["tests"] for c in t["alert_rule_test"]]
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert len(rule["annotations"]["runbook"]) > 100, name
        assert rule["annotations"]["summary"], name
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"no case fires {name}"
        assert any(not c["exp_alerts"] for c in mine), f"no case keeps {name} quiet"


def test_the_rules_use_series_that_metrics_serves(sqlite_url, tmp_path):
    factory = migrated(sqlite_url)
    pings = HostPings(HypervisorPool(lambda uri: None))  # type: ignore[arg-type,return-value]
    outbox = Outbox(factory, tmp_path / "journal")
    metrics = ServiceMetrics(
        session_factory=factory, host_pings=pings, is_leader=lambda: True, outbox=outbox
    )
    try:
        text = metrics.render().decode()
    finally:
        outbox.close()
        pings.close()
    # Samples, and the families declared without one (no host in this database yet).
    served = set(re.findall(r"^(?:# TYPE )?([a-z_]+)[ {]", text, re.M))
    used = {
        name
        for r in rules()
        for name in re.findall(r"\b((?:maintctl|process)_[a-z_]+)\b", r["expr"])
    }
    assert used - served - SERVED_ELSEWHERE == set()
    for name in (
        "maintctl_guests_over_budget",
        "maintctl_outbox_journaled_batches",
        "maintctl_database_up",
        "process_resident_memory_bytes",
        "process_open_fds",
        "maintctl_process_threads",
    ):
        assert name in served
