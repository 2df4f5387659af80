"""The smallest pipeline config file a CLI test needs: data, a work dir and validate-data's row minimums
sized for the tests' small data sets (shared by the CLI and stage-context tests)."""

from __future__ import annotations

from pathlib import Path

import yaml


def config_file(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    tree = {
        "work_dir": str(tmp_path / "work"),
        "data": {"uri": str(data)},
        "base_model": str(tmp_path / "model"),
        "validate_data": {"min_rows": {"train": 10, "evaluation": 5}},
    }
    path.write_text(yaml.safe_dump(tree))
    return path
