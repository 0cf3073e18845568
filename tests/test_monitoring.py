"""The shipped monitoring: ``promtool check rules`` accepts the alert rules, and every metric the rules and the
Grafana dashboard name is one a running service serves on ``/metrics`` (a renamed metric would silence an
alert without a word)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, free_port, start_service
from .test_operate import health_toml

MONITORING = ROOT / "config" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\bhl7bridge_[a-z0-9_]+")
#: The series names a family of each type serves.
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("_count", "_sum", "_created")}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing under CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (Debian/Ubuntu package: prometheus)")
    return path


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def expressions(dashboard: dict) -> list[str]:
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])] + [
        v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]


def test_every_metric_named_exists_on_a_running_service(tmp_path: Path) -> None:
    named = {
        "alerts.yml": set(METRIC_NAME.findall(RULES.read_text(encoding="utf-8"))),
        "grafana-dashboard.json": {
            name for expr in expressions(json.loads(DASHBOARD.read_text(encoding="utf-8")))
            for name in METRIC_NAME.findall(expr)
        },
    }  # fmt: skip
    assert all(named.values()), named
    port = free_port()
    service = start_service(tmp_path, "[listeners.main]\n" + health_toml(port))
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        service.stop()
    served = {family.name + suffix for family in text_string_to_metric_families(text)
              for suffix in SUFFIXES.get(family.type, ("",))}  # fmt: skip
    missing = {source: sorted(names - served) for source, names in named.items() if names - served}
    assert not missing, f"metrics named but not served: {missing}"
