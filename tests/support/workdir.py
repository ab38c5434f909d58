"""What every test's `workdir` holds: a small shop database, CSV and JSONL files, and CONNECTORS_YAML over them."""
from __future__ import annotations

import json
from pathlib import Path

from connectors.demo import build_shop_db

CONNECTORS_YAML = """
connectors:
  shop:
    description: Orders and customers from the test shop
    source: {kind: sql_database, url: "sqlite:///shop.db", tables: [orders, customers]}
    dataset: shop_raw
    write_disposition: replace
  products:
    source: {kind: filesystem, bucket_url: files, file_glob: "*.csv", table: products}
    dataset: catalogue
    write_disposition: replace
  events:
    source: {kind: filesystem, bucket_url: files, file_glob: "*.jsonl"}
    dataset: raw
  numbers:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 10, delay_seconds: 0}}
    dataset: raw
  slow:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 5, delay_seconds: 1.0}}
    dataset: raw
  broken:
    source: {kind: sql_database, url: "sqlite:///missing.db", tables: [nothing_here]}
"""


def fill_workdir(folder: Path) -> Path:
    """`folder`, with the shop database, the files and a connectors.yaml of CONNECTORS_YAML in it."""
    build_shop_db(folder / "shop.db", customers=20, orders=100)
    files = folder / "files"
    files.mkdir()
    (files / "products.csv").write_text("sku,name,price_cents\nA-1,Apple,120\nB-2,Bread,250\nC-3,Cheese,899\n")
    (files / "events.jsonl").write_text("\n".join(json.dumps({"id": i, "kind": "click"}) for i in range(4)) + "\n")
    (folder / "connectors.yaml").write_text(CONNECTORS_YAML)
    return folder
