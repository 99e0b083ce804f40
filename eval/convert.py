"""Converts ../shared/data/routing/llmrouter_dcrouter into eval-routing's documented format."""

from __future__ import annotations

import json
from pathlib import Path


def llmrouter(source: Path, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = json.loads((source / "train.json").read_text())
    data = out_dir / "llmrouter.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "scores": r["scores"]}) + "\n" for r in records))
    catalogue = json.loads((source / "default_llm.json").read_text())
    models = set(records[0]["scores"])
    prices = out_dir / "llmrouter-prices.json"
    prices.write_text(
        json.dumps(
            {m: {"input": catalogue[m]["input_price"], "output": catalogue[m]["output_price"]} for m in sorted(models)},
            indent=1,
        )
    )
    return data, prices
