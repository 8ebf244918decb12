"""benchmarks/cost_model.py: its arithmetic, and docs/architecture.md holding its output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_architecture_doc_holds_the_table_the_script_prints(cost_model):
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "## 10. Cost model: requests, prefixes and money at scale" in doc
    assert cost_model.table() in doc  # run the script and paste its output when this fails


def test_the_arithmetic(cost_model):
    single = cost_model.row("single", 1000, cost_model.SINGLE, 0.5)
    assert single["per_task"] == pytest.approx(5.12, abs=0.005)
    assert single["writes"] == pytest.approx(4060) and single["reads"] == pytest.approx(1059)
    assert single["prefixes"] == 3  # 4,060 writes/s under 1,750 per prefix
    assert single["shards"] == 4  # the layout to set: a power of two
    assert cost_model.row("single", 100_000, cost_model.SINGLE, 0.5)["shards"] == 256
    month = 1000 * 30 * 86400
    assert single["sqs_usd"] == pytest.approx((3 * month - 1e6) * 0.4e-6)
    assert single["sqs_batched_usd"] == pytest.approx((0.3 * month - 1e6) * 0.4e-6)
    put_class = 1 + 3.045 + 0.056 + 0.015  # DELETE_BATCH is a POST, LIST is PUT-class priced
    assert single["s3_usd"] == pytest.approx(month * (put_class * 5e-6 + 1.003 * 4e-7))
    pack = cost_model.per_task(cost_model.bulk_per_pack(2.5), 256)
    assert sum(pack.values()) == pytest.approx(10.5 / 256)
    bulk = cost_model.row("bulk", 100_000, pack, 0.5)
    assert bulk["prefixes"] == 2
    assert cost_model.fewest_prefixes(0, 0, 0.5) == 1
    assert cost_model.fewest_prefixes(100, 2751, 0.5) == 2  # reads decide
    assert "K=64" in cost_model.table(rates=[10], pack_size=64)
