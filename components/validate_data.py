"""KFP component `validate-data`: a thin caller of `safe_rlhf_v.stages.validate_data.run`.

No `from __future__ import annotations` in component modules: KFP reads the real annotation objects
(`Output[Dataset]`) to build the component interface.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().cpu, install_kfp_package=False)
def validate_data(
    config: str,
    config_overrides: list,
    data_uri: str,
    validated: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> str:
    """Validate the data set; outputs the validated data, the GX data docs page and metrics."""
    from pathlib import Path

    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import validate_data as stage

    result = stage.run(
        kfp_io.parse_config(config, config_overrides),
        validated.path,
        data_uri=data_uri,
        pipeline_run_id=kfp_io.pipeline_run_id(),
    )
    kfp_io.publish_metrics(result, metrics)
    kfp_io.publish_file(Path(validated.path) / "report.html", report)
    return result.to_json()
